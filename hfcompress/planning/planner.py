"""Choose each layer's bit width and group size under a budget, from measured costs.

A plan picks one option per layer. With the costs of :mod:`~hfcompress.planning.sensitivity`
adding up over layers, "the best model within B bytes" is a multiple-choice knapsack:

    minimize sum_m cost[m, o_m]   subject to   sum_m bytes[m, o_m] <= B

solved exactly by dynamic programming over the budget in units of ``B / 200,000`` bytes (sizes
rounded up to whole units, so the plan always fits; the few units this leaves are then spent
greedily on the upgrades that buy the most cost per byte). A Lagrangian relaxation (each layer
picks ``argmin cost + lambda * bytes``) is the textbook shortcut, but it only reaches the convex
hull of each layer's options and lost to a uniform plan of the same size in our tests. "The
smallest model within a loss" bisects the budget: the least one whose best plan meets the loss.

>>> import torch
>>> from hfcompress.planning.sensitivity import Sensitivity
>>> s = Sensitivity(["a", "b"], [(2, 64), (4, 64)], torch.tensor([[1.0, 0.1], [0.2, 0.1]]),
...                 torch.zeros(2, 2), torch.tensor([[10, 20], [10, 20]]), torch.tensor([64, 64]),
...                 torch.tensor([256, 256]), 2.0)
>>> plan_for_bytes(s, 30).formats()  # the sensitive layer a gets the 4 bits
{'a': (4, 64), 'b': (2, 64)}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import UserError
from .sensitivity import Sensitivity, predicted_perplexity_ratio


class PlanError(UserError):
    """No plan meets the request (a budget below the smallest option, a target that cannot be met)."""


@dataclass
class Plan:
    sensitivity: Sensitivity
    choice: torch.Tensor  # [M] option index per layer

    @property
    def nbytes(self) -> int:
        return int(self.sensitivity.nbytes.gather(1, self.choice[:, None]).sum())

    @property
    def cost(self) -> float:
        return float(self.sensitivity.cost.double().gather(1, self.choice[:, None]).sum())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes, scales, zero points) per weight of the planned layers."""
        return 8 * self.nbytes / int(self.sensitivity.weights.sum())

    @property
    def perplexity_ratio(self) -> float:
        """Predicted perplexity over the unquantized model's (on the calibration text)."""
        return predicted_perplexity_ratio(self.cost)

    def formats(self) -> dict[str, tuple[int, int]]:
        options = self.sensitivity.options
        return {name: options[int(o)] for name, o in zip(self.sensitivity.modules, self.choice)}

    def quantize_stage(self, base: dict) -> dict:
        """The recipe's quantize stage (``base``: its other keys): the most common option as the
        stage's bits and group size, every other option as one ``overrides`` entry."""
        formats = self.formats()
        common = Counter(formats.values()).most_common(1)[0][0]
        stage = dict(base)
        stage["bits"], stage["group_size"] = common
        by_option: dict[tuple[int, int], list[str]] = {}
        for name, option in formats.items():
            if option != common:
                by_option.setdefault(option, []).append(name)
        stage["overrides"] = [{"modules": names, "bits": bits, "group_size": group_size}
                              for (bits, group_size), names in sorted(by_option.items())]
        if not stage["overrides"]:
            del stage["overrides"]
        return stage

    def describe(self) -> str:
        counts = Counter(self.formats().values())
        mix = ", ".join(f"{n} layers {bits}-bit g{group}" for (bits, group), n in sorted(counts.items()))
        return (f"{self.nbytes / 1e6:.2f} MB for the planned layers ({self.bits_per_weight:.3f} bits per weight); "
                f"predicted perplexity x{self.perplexity_ratio:.4f} of the unquantized model's; {mix}")


def _knapsack(cost: torch.Tensor, nbytes: torch.Tensor, budget: float, resolution: int = 200_000) -> torch.Tensor | None:
    """The choice of least total ``cost`` with total ``nbytes`` at most ``budget`` (exact up to the
    byte unit ``budget / resolution``, sizes rounded up so the budget always holds), or None.

    Dynamic programming over the budget: ``best[b]`` is the least cost of the layers so far within
    ``b`` units; each layer adds its options' (cost, units) to it. ``resolution`` x layers x options
    steps, vectorized over ``b``.
    """
    if float(nbytes.min(1).values.sum()) > budget:
        return None
    unit = max(budget / resolution, 1.0)
    capacity = int(budget // unit)
    units = torch.ceil(nbytes.double() / unit).long()
    if int(units.min(1).values.sum()) > capacity:  # rounding up cost the smallest plan its fit
        return None
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # no layer yet: nothing spent, at any budget
    picks = torch.empty(len(cost), capacity + 1, dtype=torch.uint8)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    for m in range(len(cost)):
        candidates = torch.full((cost.shape[1], capacity + 1), float("inf"), dtype=torch.float64)
        for o in range(cost.shape[1]):
            w = int(units[m, o])
            if w <= capacity:
                candidates[o, w:] = best[: capacity + 1 - w] + cost[m, o]
        best, picks[m] = candidates.min(dim=0)
        best = torch.where(torch.isfinite(best), best, inf)
    choice = torch.empty(len(cost), dtype=torch.long)
    b = capacity
    for m in reversed(range(len(cost))):
        choice[m] = int(picks[m, b])
        b -= int(units[m, choice[m]])
    return choice


def _fill(primary: torch.Tensor, secondary: torch.Tensor, choice: torch.Tensor, limit: float) -> torch.Tensor:
    """Spend what is left under ``limit`` on the switches that lower ``primary`` the most per unit of
    ``secondary``, one at a time."""
    choice = choice.clone()
    rows = torch.arange(len(choice))
    while True:
        slack = limit - float(secondary[rows, choice].sum())
        gain = primary[rows, choice][:, None] - primary  # > 0: the switch lowers primary
        extra = secondary - secondary[rows, choice][:, None]
        fits = (gain > 1e-15) & (extra <= slack)
        if not fits.any():
            return choice
        ratio = torch.where(fits, gain / extra.clamp_min(1e-30), torch.full_like(gain, -1.0))
        ratio = torch.where(fits & (extra <= 0), torch.full_like(gain, float("inf")), ratio)  # free wins first
        flat = int(ratio.argmax())
        choice[flat // primary.shape[1]] = flat % primary.shape[1]


def plan_for_bytes(sensitivity: Sensitivity, budget: float) -> Plan:
    """The plan of least predicted cost whose planned layers take at most ``budget`` bytes."""
    cost, nbytes = sensitivity.cost.double(), sensitivity.nbytes.double()
    choice = _knapsack(cost, nbytes, budget)
    if choice is None:
        raise PlanError(f"{budget / 1e6:.2f} MB is below the smallest plan ({float(nbytes.min(1).values.sum()) / 1e6:.2f} "
                        "MB, every layer at its smallest option); raise the target or measure smaller options")
    return Plan(sensitivity, _fill(cost, nbytes, choice, budget))


def plan_for_cost(sensitivity: Sensitivity, max_cost: float) -> Plan:
    """The smallest plan whose predicted cost (nats per token) is at most ``max_cost``: the least
    budget whose best plan meets it, by bisection (the best cost only falls as the budget grows)."""
    cost, nbytes = sensitivity.cost.double(), sensitivity.nbytes.double()
    max_cost *= 1 + 1e-6  # costs are stored in float32: sums in another order differ in the last digits
    if float(cost.min(1).values.sum()) > max_cost:
        best = float(cost.min(1).values.sum())
        raise PlanError(f"no measured option meets the target: even the most precise plan is predicted at perplexity "
                        f"x{predicted_perplexity_ratio(best):.4f}; allow more, or measure wider options")
    low, high = float(nbytes.min(1).values.sum()), float(nbytes.max(1).values.sum())
    total = lambda choice: float(cost.gather(1, choice[:, None]).sum())  # noqa: E731
    smallest = nbytes.argmin(dim=1)
    if total(smallest) <= max_cost:
        return Plan(sensitivity, smallest)
    best = _knapsack(cost, nbytes, high)
    if total(best) > max_cost:  # the most precise options may not be the largest ones: take the cheapest in cost
        best = cost.argmin(dim=1)
        high = float(nbytes.gather(1, best[:, None]).sum())
    while high - low > max(1.0, 1e-4 * high):
        middle = (low + high) / 2
        choice = _knapsack(cost, nbytes, middle, resolution=20_000)
        if choice is not None and total(choice) <= max_cost:
            high, best = middle, choice
        else:
            low = middle
    return Plan(sensitivity, _fill(nbytes, cost, best, max_cost))


def bytes_for_bits(sensitivity: Sensitivity, bits: float, group_size: int) -> float:
    """The size of a uniform ``bits``-bit model with groups of ``group_size``, as users count bits:
    a measured width's own size, and between two widths the size in proportion (3.5 bits: halfway
    between uniform 3-bit and 4-bit), so a plan "at 3.5 bits" holds the same scales' share as the
    uniform recipes it is compared with."""
    widths = sorted(b for b, g in sensitivity.options if g == group_size)
    if not widths:
        raise PlanError(f"no option with groups of {group_size} was measured; measured: "
                        + ", ".join(f"{b}-bit g{g}" for b, g in sensitivity.options))
    if not widths[0] <= bits <= widths[-1]:
        raise PlanError(f"{bits} bits is outside the measured widths with groups of {group_size} "
                        f"({widths[0]} to {widths[-1]} bits); give bits in that range or a --target-size")
    below = max(b for b in widths if b <= bits)
    above = min(b for b in widths if b >= bits)
    low = uniform_plan(sensitivity, below, group_size).nbytes
    if above == below:
        return float(low)
    high = uniform_plan(sensitivity, above, group_size).nbytes
    return low + (high - low) * (bits - below) / (above - below)


def uniform_plan(sensitivity: Sensitivity, bits: int, group_size: int) -> Plan:
    """Every layer at one option (to compare a plan with)."""
    index = sensitivity.option_index(bits, group_size)
    return Plan(sensitivity, torch.full((len(sensitivity.modules),), index, dtype=torch.long))
