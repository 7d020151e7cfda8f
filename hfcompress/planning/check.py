"""What a plan really costs: its layers quantized together, the loss measured on held-out windows.

The sensitivity prices each layer's quantization alone, to second order, on the calibration text;
summed over layers it misses both how errors combine and, above all, how the damage depends on the
text read. On SmolLM2 with GPTQ, uniform 4-bit g64 is predicted at x1.139 of the unquantized
perplexity; quantized whole it measures x1.073 on unseen windows of its calibration text (Austen),
x1.220 on the King James Bible and x1.181 on the whole WikiText-2 test split. A quality target is
therefore checked by measurement: every planned layer replaced by its quantization in the plan's
option (the stage's method with the layer's own calibration Hessian, as the sensitivity quantized
it), all at once, and the model's perplexity taken on windows the sensitivity did not see,
ideally of text like what the model will read. :func:`plan_within` searches the planner's cost
target until that measured perplexity meets the user's.

Each layer is quantized against the unquantized model's inputs, where ``compress`` quantizes
block after block on the quantized model's own activations; GPTQ's sequential pass corrects some
of the upstream error, so the check tends to overstate the loss a little (the safe side).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..evaluation import evaluate_perplexity
from ..models import linear_weight
from ..recipe import QuantizeStage
from .planner import Menu, Plan, PlanError, menu_of, plan_for_cost
from .sensitivity import Sensitivity, _quantized_change, _Statistics

logger = logging.getLogger(__name__)


class PlanCheck:
    """Measures plans on one model: ``ratio(plan)`` is the perplexity of the model with the plan's
    layers quantized over the unquantized model's, on ``held_out`` windows."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module], stage: QuantizeStage,
                 windows: torch.Tensor, held_out: torch.Tensor):
        self.model, self.targets, self.stage = model, targets, stage
        device = next(p for p in model.parameters() if not p.is_meta).device
        stats = _Statistics(targets)  # under no_grad its hooks take the inputs' Hessians only
        handles = [module.register_forward_hook(stats.forward_hook(name)) for name, module in targets.items()]
        try:
            with torch.no_grad():
                for window in tqdm(windows, desc="plan check: Hessians", unit="window"):
                    stats._last = None
                    model(input_ids=window[None].to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        self.hessians = {name: stats.hessian(name) for name in targets}
        self.held_out = held_out
        self._quantized: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}

    @property
    def held_out(self) -> torch.Tensor:
        return self._held_out

    @held_out.setter
    def held_out(self, windows: torch.Tensor) -> None:
        """Other windows to measure on: the unquantized model's loss on them is taken again."""
        self._held_out = windows
        self.base_loss = self._loss()

    def _loss(self) -> float:
        """The model's mean next-token loss on the held-out windows, as ``hfcompress eval`` takes it."""
        windows = self._held_out
        return evaluate_perplexity(self.model, None, windows, seq_len=windows.shape[1], compute_dtype=None,
                                   progress=False).nll

    @torch.no_grad()
    def ratio(self, plan: Plan) -> float:
        """A cut (a plan of :mod:`.joint`) is the output projection's removed input columns zeroed
        before it is quantized: the same function as the pruned model's."""
        zeroed = plan.zeroed()
        wanted = {name: (option, tuple(zeroed.get(name, ()))) for name, option in plan.formats().items()}
        # Quantized weights are kept for the plan in hand only (one model's worth of memory):
        # plans a search visits one after another share most of their layers' options.
        kept = {key: value for key, value in self._quantized.items() if wanted.get(key[0]) == key[1]}
        originals = {}
        try:
            for name, (option, columns) in tqdm(wanted.items(), desc="plan check: layers", unit="layer"):
                weight = linear_weight(self.targets[name])
                if (name, (option, columns)) not in kept:
                    W, H = weight.detach().float(), self.hessians[name]
                    if columns:  # removed inputs: dead to GPTQ (zeroed, no error compensated into them)
                        W, H = W.clone(), H.clone()
                        S = torch.as_tensor(columns)
                        W[:, S], H[S, :], H[:, S] = 0, 0, 0
                    Q = W + _quantized_change(W, H, self.stage, *option)
                    kept[(name, (option, columns))] = Q.to(weight.dtype)
                originals[name] = weight.detach().clone()
                weight.copy_(kept[(name, (option, columns))])
            loss = self._loss()
        finally:
            for name, original in originals.items():
                linear_weight(self.targets[name]).copy_(original)
        self._quantized = kept
        return math.exp(loss - self.base_loss)


def plan_within(source: Sensitivity | Menu, max_ratio: float, measure: Callable[[Plan], float],
                steps: int = 6, tolerance: float = 0.03) -> tuple[Plan, float]:
    """The smallest plan found whose *measured* perplexity ratio is at most ``max_ratio``, and that
    ratio.

    The planner's plans for a cost target ``t`` (the smallest plan predicted within ``t``) grow as
    ``t`` falls; ``t`` is searched, starting from the target itself, by the secant through the
    measured log-ratios (the prediction is off by a roughly constant factor), then by bisection
    between the largest ``t`` that met the target and the smallest that did not, for at most
    ``steps`` measurements or until the two are within ``tolerance`` of each other.
    """
    goal = math.log(max_ratio)
    menu = menu_of(source)
    floor = menu.totals(*menu.most_precise())[0]  # the most precise plan's prediction
    met: tuple[float, Plan, float] | None = None  # (t, plan, measured ratio): the largest t that met the goal
    missed: float | None = None  # the smallest t that did not
    t, tried = goal, {}
    for _ in range(steps):
        t = max(t, floor)
        plan = plan_for_cost(menu, t)
        if plan.nbytes not in tried:  # a search can land on the same plan twice
            tried[plan.nbytes] = measure(plan)
        ratio = tried[plan.nbytes]
        logger.info("plan check: %.2f MB predicted x%.4f measured x%.4f", plan.nbytes / 1e6, plan.perplexity_ratio,
                    ratio)
        if ratio <= max_ratio:
            if met is None or t > met[0]:
                met = (t, plan, ratio)
        else:
            if t <= floor * (1 + 1e-9):
                raise PlanError(f"even the most precise plan measures perplexity x{ratio:.4f} of the unquantized "
                                f"model's (asked for x{max_ratio:.4f}); allow more, or measure wider options")
            missed = t if missed is None else min(missed, t)
        if met is not None and missed is not None:
            if missed / met[0] < 1 + tolerance:
                break
            t = math.sqrt(met[0] * missed)
        else:
            # Through the origin: the measured log-ratio taken as proportional to the predicted one.
            # Where it met the goal easily, grow at most fourfold.
            measured = max(math.log(ratio), 1e-9)
            t = min(t * goal / measured, 4 * t) if measured < goal else t * goal / measured
    if met is None:
        raise PlanError(f"no plan met perplexity x{max_ratio:.4f} in {steps} measured tries (the last measured "
                        f"x{ratio:.4f} at {plan.nbytes / 1e6:.2f} MB); allow more, or raise --check-steps")
    return met[1], met[2]
