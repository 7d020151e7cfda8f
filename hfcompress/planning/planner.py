"""Choose each layer's bit width and group size under a budget, from measured costs (and, where
the sensitivity priced them, each decoder layer's cuts: :mod:`.joint`).

A plan picks one option per layer. With the costs of :mod:`~hfcompress.planning.sensitivity`
adding up over layers, "the best model within B bytes" is a multiple-choice knapsack:

    minimize sum_m cost[m, o_m]   subject to   sum_m bytes[m, o_m] <= B

solved exactly by dynamic programming over the budget in units of ``B / 200,000`` bytes (sizes
rounded up to whole units, so the plan always fits; the few units this leaves are then spent
greedily on the upgrades that buy the most cost per byte). A Lagrangian relaxation (each layer
picks ``argmin cost + lambda * bytes``) is the textbook shortcut, but it only reaches the convex
hull of each layer's options and lost to a uniform plan of the same size in our tests. "The
smallest model within a loss" bisects the budget: the least one whose best plan meets the loss.

Cuts couple layers: a decoder layer's attention cut shrinks its four projections, and their
formats' bytes and costs depend on it. Such layers form a :class:`Group`; the program runs
through a group once per cut (each of its layers an item, priced under that cut, the cut's own
cost added), and keeps, at every budget, the cheapest of the cuts. That is still exact, at the
work of one pass per cut.

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
from functools import cached_property

import torch

from ..errors import UserError
from .sensitivity import Sensitivity, predicted_perplexity_ratio


class PlanError(UserError):
    """No plan meets the request (a budget below the smallest option, a target that cannot be met)."""


@dataclass
class Group:
    """Layers (sensitivity ``rows``) planned together: one of the cuts (column 0: none) and, under
    it, a format per layer. ``cost[a, j, o]`` and ``nbytes[a, j, o]``: layer ``j`` in format ``o``
    under cut ``a``; ``cut_cost[a]`` the cut's own cost. A layer outside every cut is a group of one
    layer and one cut."""

    kind: str | None  # "heads", "ffn", or None
    block: int | None
    rows: list[int]
    cut_cost: torch.Tensor  # [A] float64
    cost: torch.Tensor  # [A, len(rows), O] float64
    nbytes: torch.Tensor  # [A, len(rows), O] float64


class Menu:
    """What a plan chooses from: the sensitivity's layers, in ``groups`` where cuts couple them."""

    def __init__(self, sensitivity: Sensitivity, groups: list[Group] = ()):
        self.sensitivity = sensitivity
        self.groups = list(groups)
        cost, nbytes = sensitivity.cost.double(), sensitivity.nbytes.double()
        covered = {row for group in self.groups for row in group.rows}
        self.groups += [Group(None, None, [i], torch.zeros(1, dtype=torch.float64), cost[i][None, None],
                              nbytes[i][None, None]) for i in range(len(sensitivity.modules)) if i not in covered]

    def tables(self, cuts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Under ``cuts`` (one per group): every layer's format costs and bytes ``[M, O]`` and the
        cuts' summed cost."""
        shape = self.sensitivity.cost.shape
        cost, nbytes = torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64)
        total = 0.0
        for group, a in zip(self.groups, cuts.tolist()):
            cost[group.rows], nbytes[group.rows] = group.cost[a], group.nbytes[a]
            total += float(group.cut_cost[a])
        return cost, nbytes, total

    def totals(self, cuts: torch.Tensor, formats: torch.Tensor) -> tuple[float, float]:
        """(cost, bytes) of a choice."""
        cost, nbytes, cut = self.tables(cuts)
        rows = torch.arange(len(formats))
        return cut + float(cost[rows, formats].sum()), float(nbytes[rows, formats].sum())

    def _extreme(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest choice (``key`` "nbytes") or the most precise ("cost"), group by group."""
        cuts, formats = [], torch.empty(len(self.sensitivity.modules), dtype=torch.long)
        for group in self.groups:
            table = getattr(group, key)  # [A, m, O]
            score = table.min(2).values.sum(1) + (group.cut_cost if key == "cost" else 0)
            a = int(score.argmin())
            cuts.append(a)
            formats[group.rows] = table[a].argmin(1)
        return torch.tensor(cuts), formats

    def smallest(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._extreme("nbytes")

    def most_precise(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._extreme("cost")

    def largest_bytes(self) -> float:
        return sum(float(group.nbytes.max(2).values.sum(1).max()) for group in self.groups)

    def knapsack(self, budget: float, resolution: int = 200_000) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The choice of least total cost within ``budget`` bytes (exact up to the byte unit
        ``budget / resolution``, sizes rounded up so the budget always holds), or None.

        Dynamic programming over the budget: ``best[b]`` is the least cost of the groups so far
        within ``b`` units; each layer of a group adds its formats' (cost, units) to it, once per
        cut, and the group keeps the cheapest cut at every ``b``. Layers x cuts x formats steps,
        each vectorized over ``b``.
        """
        if self.totals(*self.smallest())[1] > budget:
            return None
        unit = max(budget / resolution, 1.0)
        capacity = int(budget // unit)
        units = [torch.ceil(group.nbytes / unit).long() for group in self.groups]
        if sum(int(u.min(2).values.sum(1).min()) for u in units) > capacity:  # rounding up cost the fit
            return None
        best = torch.zeros(capacity + 1, dtype=torch.float64)  # no layer yet: nothing spent, at any budget
        candidates = torch.empty(len(self.sensitivity.options), capacity + 1, dtype=torch.float64)  # reused
        picks, cut_picks = [], []
        for group, group_units in zip(self.groups, units):
            outcomes, group_picks = [], []
            for a in range(len(group.cut_cost)):
                current, layer_picks = best + float(group.cut_cost[a]), []
                for j in range(len(group.rows)):
                    current, chosen = _step(current, group_units[a, j], group.cost[a, j], candidates)
                    layer_picks.append(chosen)
                outcomes.append(current)
                group_picks.append(layer_picks)
            if len(outcomes) == 1:
                best, cut = outcomes[0], None
            else:
                best, cut = torch.stack(outcomes).min(dim=0)
            picks.append(group_picks)
            cut_picks.append(cut)
        cuts = torch.zeros(len(self.groups), dtype=torch.long)
        formats = torch.empty(len(self.sensitivity.modules), dtype=torch.long)
        b = capacity
        for g in reversed(range(len(self.groups))):
            group = self.groups[g]
            a = 0 if cut_picks[g] is None else int(cut_picks[g][b])
            cuts[g] = a
            for j in reversed(range(len(group.rows))):
                o = int(picks[g][a][j][b])
                formats[group.rows[j]] = o
                b -= int(units[g][a, j, o])
        return cuts, formats

    def fill(self, cuts: torch.Tensor, formats: torch.Tensor, limit: float, lower: str = "cost") -> torch.Tensor:
        """Formats (the cuts kept) after spending what is left under ``limit`` on the switches
        that lower ``lower`` ("cost" within ``limit`` bytes, or "bytes" within ``limit`` cost)
        the most per unit of the other, one at a time."""
        cost, nbytes, cut = self.tables(cuts)
        if lower == "cost":
            return _fill(cost, nbytes, formats, limit)
        return _fill(nbytes, cost, formats, limit - cut)

    def plan(self, cuts: torch.Tensor, formats: torch.Tensor) -> Plan:
        return Plan(self, cuts, formats)


def _step(best: torch.Tensor, units: torch.Tensor, cost: torch.Tensor,
          candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One item of the knapsack: ``best`` after it takes one of its options (``units``, ``cost``),
    and the option chosen at every budget."""
    capacity = len(best) - 1
    candidates.fill_(float("inf"))
    for o in range(len(cost)):
        w = int(units[o])
        if w <= capacity:
            torch.add(best[: capacity + 1 - w], float(cost[o]), out=candidates[o, w:])  # in place: no temporary
    best, chosen = candidates[: len(cost)].min(dim=0)
    return best, chosen.to(torch.uint8)


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


def menu_of(source: Sensitivity | Menu) -> Menu:
    """A menu as given, or a sensitivity's layers' formats alone."""
    return source if isinstance(source, Menu) else Menu(source)


def quantize_stage_of(formats: dict[str, tuple[int, int]], base: dict) -> dict:
    """The recipe's quantize stage for per-layer ``formats`` (``base``: its other keys): the most
    common format as the stage's bits and group size, every other one as an ``overrides`` entry."""
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


@dataclass
class Plan:
    menu: Menu
    cut_choice: torch.Tensor  # [groups] the cut of each group (0: none)
    choice: torch.Tensor  # [M] format index per layer

    @property
    def sensitivity(self) -> Sensitivity:
        return self.menu.sensitivity

    @cached_property
    def _totals(self) -> tuple[float, float]:
        return self.menu.totals(self.cut_choice, self.choice)  # a plan is not changed once made

    @property
    def nbytes(self) -> int:
        return round(self._totals[1])

    @property
    def cost(self) -> float:
        return self._totals[0]

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (codes, scales, zero points) per weight of the planned layers (as they were before cuts)."""
        return 8 * self.nbytes / int(self.sensitivity.weights.sum())

    @property
    def perplexity_ratio(self) -> float:
        """Predicted perplexity over the unquantized model's (on the calibration text)."""
        return predicted_perplexity_ratio(self.cost)

    def formats(self) -> dict[str, tuple[int, int]]:
        options = self.sensitivity.options
        return {name: options[int(o)] for name, o in zip(self.sensitivity.modules, self.choice)}

    def cuts(self) -> dict[str, dict[int, float | int]]:
        """Per kind of cut, the amount each cut decoder layer removes (layers not cut left out)."""
        result: dict[str, dict[int, float | int]] = {}
        for group, a in zip(self.menu.groups, self.cut_choice.tolist()):
            if a:
                amounts = self.sensitivity.prune.costs[group.kind].amounts
                result.setdefault(group.kind, {})[group.block] = amounts[a]
        return result

    def zeroed(self) -> dict[str, list[int]]:
        """The output projections' input columns the cuts remove: zeroing them is the cut (what
        :class:`~hfcompress.planning.check.PlanCheck` measures)."""
        zeroed = {}
        for kind, layers in self.cuts().items():
            costs = self.sensitivity.prune.costs[kind]
            for block, amount in layers.items():
                out = next(name for name, axis, *_ in costs.members[costs.blocks.index(block)] if axis == "in")
                zeroed[out] = self.sensitivity.prune.removed(kind, block, amount)
        return zeroed

    def quantize_stage(self, base: dict) -> dict:
        """The recipe's quantize stage (``base``: its other keys), see :func:`quantize_stage_of`."""
        return quantize_stage_of(self.formats(), base)

    def prune_stage(self, scores: str) -> dict | None:
        """The recipe's prune stage: one override per amount (the layers that cut it), the units
        chosen from the ``scores`` file (the sensitivity's activation scores); None without cuts."""
        by_amount: dict[tuple[str, float | int], list[int]] = {}
        for kind, layers in self.cuts().items():
            for block, amount in sorted(layers.items()):
                by_amount.setdefault((kind, amount), []).append(block)
        if not by_amount:
            return None
        overrides = [{"layers": blocks, kind: amount} for (kind, amount), blocks in sorted(by_amount.items(), key=str)]
        return {"importance": "activation", "gqa": "groups", "scores": scores, "overrides": overrides}

    def describe(self) -> str:
        counts = Counter(self.formats().values())
        mix = ", ".join(f"{n} layers {bits}-bit g{group}" for (bits, group), n in sorted(counts.items()))
        cuts = "".join(f"; {kind} cut in {len(layers)} layers (" + ", ".join(
            f"{n} by {amount}" for amount, n in sorted(Counter(layers.values()).items())) + ")"
            for kind, layers in sorted(self.cuts().items()))
        return (f"{self.nbytes / 1e6:.2f} MB for the planned layers ({self.bits_per_weight:.3f} bits per weight); "
                f"predicted perplexity x{self.perplexity_ratio:.4f} of the unquantized model's{cuts}; {mix}")


def plan_for_bytes(source: Sensitivity | Menu, budget: float) -> Plan:
    """The plan of least predicted cost whose planned layers take at most ``budget`` bytes
    (``source``: a sensitivity, whose layers' formats are chosen, or a :class:`Menu` with cuts)."""
    menu = menu_of(source)
    choice = menu.knapsack(budget)
    if choice is None:
        raise PlanError(f"{budget / 1e6:.2f} MB is below the smallest plan ({menu.totals(*menu.smallest())[1] / 1e6:.2f} "
                        "MB, every layer at its smallest option); raise the target or measure smaller options")
    cuts, formats = choice
    return menu.plan(cuts, menu.fill(cuts, formats, budget, lower="cost"))


def plan_for_cost(source: Sensitivity | Menu, max_cost: float) -> Plan:
    """The smallest plan whose predicted cost (nats per token) is at most ``max_cost``: the least
    budget whose best plan meets it, by bisection (the best cost only falls as the budget grows)."""
    menu = menu_of(source)
    max_cost *= 1 + 1e-6  # costs are stored in float32: sums in another order differ in the last digits
    precise = menu.most_precise()
    least = menu.totals(*precise)[0]
    if least > max_cost:
        raise PlanError(f"no measured option meets the target: even the most precise plan is predicted at perplexity "
                        f"x{predicted_perplexity_ratio(least):.4f}; allow more, or measure wider options")
    smallest = menu.smallest()
    smallest_cost, low = menu.totals(*smallest)
    high = menu.largest_bytes()
    if smallest_cost <= max_cost:
        return menu.plan(*smallest)
    best = menu.knapsack(high)
    if menu.totals(*best)[0] > max_cost:  # the most precise options may not be the largest ones
        best = precise
        high = menu.totals(*precise)[1]
    while high - low > max(1.0, 1e-4 * high):
        middle = (low + high) / 2
        choice = menu.knapsack(middle, resolution=20_000)
        if choice is not None and menu.totals(*choice)[0] <= max_cost:
            high, best = middle, choice
        else:
            low = middle
    cuts, formats = best
    return menu.plan(cuts, menu.fill(cuts, formats, max_cost, lower="bytes"))


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
    menu = Menu(sensitivity)
    return menu.plan(torch.zeros(len(menu.groups), dtype=torch.long),
                     torch.full((len(sensitivity.modules),), index, dtype=torch.long))
