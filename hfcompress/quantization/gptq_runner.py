"""GPTQ's lifecycle: calibration hooks, shared Hessians, the block-by-block loop, resume.

The maths is in ``gptq.py``; this file decides which inputs feed which Hessian and in what order
layers are quantized:

- linear layers that read the same input tensor (q/k/v, gate/up) share one Hessian, found by
  identity of the input tensor while the block runs, so no per-family list is needed;
- with ``true_sequential`` the groups of a block are quantized in the order the forward pass
  reaches them, each with a Hessian of inputs computed through the already quantized groups. On a
  chained walk every window goes through the block in one batched call: a pre-hook on each
  group's first layer solves the group from all windows' inputs and the call goes on with its
  quantized weights, so the call's outputs are already the next block's inputs (one block
  forward per window instead of two, for all windows' activations in memory at once). A replayed
  walk (or several processes) runs the windows up to each group in turn instead;
- otherwise, after a block is quantized the calibration windows run through it again, and its
  quantized outputs feed the next block;
- a module that several blocks share (``share`` stage) is quantized once, at its last user, with
  the Hessians of all its users accumulated together; until then its users compute with the
  float weights;
- a module the calibration never reaches (a Mamba mixer reading ``dt_proj.weight`` directly),
  and an expert that fewer than ``experts.min_tokens`` calibration tokens were routed to, is
  rounded to nearest (RTN) instead, and the log names it. With ``experts.calibrate_all`` every
  expert sees every token while its Hessian is collected (only the routed outputs move on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import BlockInputs, input_hooks, run_block, run_block_together, walk_blocks
from .. import distributed
from ..precision import native_precision
from ..residency import home_device
from ..errors import CalibrationError
from ..models import ExpertLinears, decoder_blocks, linear_shape, linear_weight
from ..recipe import QuantizeStage
from .resume import ResumeState
from .block_tuning import tune_block_scales
from .gptq import (GPTQResult, accumulate_hessian, asymmetric_target, gptq_quantize, input_statistics, refit_scales,
                   relative_error)
from .grid import QuantizedWeight
from .qlinear import LinearFormat, QuantLinear
from .rtn import quantize_rtn

logger = logging.getLogger(__name__)


class InputTracker:
    """Accumulates one Hessian per distinct input tensor and learns which layers share it.

    With ``reference`` set (before each window: every target's input in the float model for that
    window, by name), it accumulates the cross products of GPTQ's asymmetric calibration too, less
    their Hessians (``cross`` holds ``D`` of :func:`.gptq.input_statistics`: ``C = H + D``).
    """

    def __init__(self, accumulate: set[str] | None = None, compute_dtype: torch.dtype | None = None):
        self.accumulate = accumulate  # leaders to accumulate for (None: all)
        self.compute_dtype = compute_dtype
        self.order: list[str] = []  # group leaders, in the order the forward pass reaches them
        self.groups: dict[str, list[str]] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.reference: dict[str, torch.Tensor] | None = None
        self.cross: dict[str, torch.Tensor] = {}
        self.unpaired: set[str] = set()  # leaders whose float inputs did not match token for token (routed experts)
        self._last: tuple[torch.Tensor, str] | None = None

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if self._last is not None and x is self._last[0]:
            leader = self._last[1]
            if name not in self.groups[leader]:
                self.groups[leader].append(name)
            return
        self._last = (x, name)
        if name not in self.groups:
            self.groups[name] = [name]
            self.order.append(name)
        if self.accumulate is None or name in self.accumulate:
            count = self.counts.get(name, 0)
            if self.reference is not None:
                self._accumulate_cross(name, x, count)
            H = self.hessians.get(name)
            if H is None:
                H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            self.hessians[name], self.counts[name] = accumulate_hessian(H, x, count, self.compute_dtype)

    def _accumulate_cross(self, name: str, x: torch.Tensor, count: int) -> None:
        reference = self.reference.get(name)
        if reference is None or reference.shape != x.shape or name in self.unpaired:
            self.unpaired.add(name)
            self.cross.pop(name, None)
            return
        C = self.cross.get(name)
        if C is None:
            C = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        self.cross[name] = accumulate_hessian(C, x, count, self.compute_dtype, reference=reference - x)[0]

    def release(self) -> None:
        self._last = None


class SharedHessians:
    """Hessians of modules that several blocks use, accumulated over the users up to the last one."""

    def __init__(self, users: dict[int, list[tuple[int, str]]]):
        self.users = users  # id(module) -> [(block index, name in the block), ...] in block order
        self.pending: dict[int, tuple[torch.Tensor, int]] = {}

    def is_shared(self, module: nn.Module) -> bool:
        return id(module) in self.users

    def add(self, module: nn.Module, H: torch.Tensor, count: int, block: int) -> torch.Tensor | None:
        """Add this block's Hessian; the total at the last user, else None (solve later)."""
        if id(module) in self.pending:
            H0, n0 = self.pending.pop(id(module))
            H, count = (H0 * n0 + H * count) / (n0 + count), n0 + count  # both are means over their tokens
        if block != self.users[id(module)][-1][0]:
            self.pending[id(module)] = (H, count)
            return None
        return H


def _set_weight(module: nn.Module, weight: torch.Tensor | QuantizedWeight, rows: int = 1024) -> None:
    """Make ``module`` compute with ``weight`` ``[out, in]`` (what its QuantLinear will compute);
    a :class:`QuantizedWeight` is dequantized ``rows`` rows at a time, straight into the module."""
    target = linear_weight(module)
    if isinstance(weight, torch.Tensor):
        target.data.copy_(weight.to(target.dtype))
        return
    for start in range(0, target.shape[0], rows):
        stop = min(start + rows, target.shape[0])
        target.data[start:stop].copy_(weight.rows(start, stop).dequantize().to(target.dtype))


class GPTQBlockQuantizer:
    """Quantizes the targeted linear layers of one block at a time."""

    def __init__(self, stage: QuantizeStage, device: torch.device, compute_dtype: torch.dtype | None = None,
                 shared: SharedHessians | None = None, experts: set[str] | frozenset = frozenset(),
                 reference: BlockInputs | None = None, formats: dict[str, LinearFormat] | None = None):
        self.stage = stage
        # The float model's stream at this block (asymmetric calibration); the block's pass over
        # it writes the float model's outputs back for the next block.
        self.reference = reference
        self.shared = shared or SharedHessians({})
        self.device = device
        self.compute_dtype = compute_dtype
        # The Hessians' and cross products' products (the forwards stay in compute_dtype); auto:
        # bfloat16 where the device multiplies it natively.
        if stage.hessian_dtype == "auto":
            self.hessian_dtype = torch.bfloat16 if native_precision(torch.bfloat16, device) else compute_dtype
        else:
            self.hessian_dtype = getattr(torch, stage.hessian_dtype) if stage.hessian_dtype else compute_dtype
        self.experts = experts  # names (relative to their block) of expert linears
        # Each module's format (names relative to the block); the stage's for any not listed.
        self.formats = formats or {}
        self.default_format = stage.linear_format(None)
        self.rounded: dict[str, str] = {}  # module -> why it was rounded (RTN) instead of solved
        # The quantized block's outputs, when quantize_block computed them on its way (one pass).
        self.block_outputs: torch.Tensor | None = None

    def format_of(self, name: str) -> LinearFormat:
        return self.formats.get(name, self.default_format)

    def round(self, name: str, module: nn.Module, why: str) -> GPTQResult:
        """RTN for a module GPTQ cannot calibrate; its weight is set to what it will compute."""
        fmt = self.format_of(name)
        W = linear_weight(module).detach().float()
        quantized: QuantizedWeight = quantize_rtn(W, fmt.bits, fmt.group_size, fmt.sym, fmt.torch_scale_dtype)
        dequantized = quantized.dequantize()
        error = float((W - dequantized).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))
        _set_weight(module, dequantized)
        self.rounded[name] = why
        return GPTQResult(quantized, 0.0, error)

    def _quantize(self, modules: dict[str, nn.Module], H: torch.Tensor,
                  cross: torch.Tensor | None = None) -> dict[str, GPTQResult]:
        """GPTQ for modules that share the Hessian ``H`` and their format, solved as one matrix.

        Rows of ``W`` are quantized independently given ``H`` (their own scales, their own error
        feedback), so stacking the modules' rows gives each module exactly its own result while
        the column loop runs once instead of once per module. With ``cross`` (asymmetric
        calibration) GPTQ reproduces ``asymmetric_target`` rather than ``W`` itself.
        """
        s = self.stage
        fmt = self.format_of(next(iter(modules)))
        weights = [linear_weight(m).detach().float() for m in modules.values()]
        H = H.to(weights[0].device)
        W = torch.cat(weights) if len(weights) > 1 else weights[0]  # one module: its weight itself (not written here)
        if cross is not None:
            W = W + s.asymmetric * (asymmetric_target(W, H, cross.to(W.device), s.damp, s.asymmetric_damp) - W)
        stacked = gptq_quantize(W, H, fmt.bits, fmt.group_size, fmt.sym, damp=s.damp,
                                block_size=s.block_size, act_order=s.act_order, static_groups=s.static_groups,
                                mse=s.mse, mse_step=s.mse_step, mse_grow=s.mse_grow, shrink=s.shrink,
                                scale_dtype=fmt.torch_scale_dtype,
                                measure=False)  # each module's error is measured below
        quantized = stacked.weight
        if s.refit:
            quantized = refit_scales(W, H, quantized, fmt.torch_scale_dtype)
        weights = list(W.split([w.shape[0] for w in weights]))
        results, start = {}, 0
        for (name, module), W in zip(modules.items(), weights):
            part = quantized.rows(start, start + W.shape[0])
            start += W.shape[0]
            # W may share storage with the module's weight (a float32 model): measure before writing.
            results[name] = GPTQResult(part, stacked.damp, relative_error(W, part, H))
            _set_weight(module, part)
        return results

    def _quantize_group(self, group: dict[str, nn.Module], H: torch.Tensor, count: int, block: int,
                        deferred: set[str], cross: torch.Tensor | None = None) -> dict[str, GPTQResult]:
        """Solve a group that shares ``H``; shared modules join with their other users' Hessians;
        starved experts are rounded."""
        buckets: dict[object, tuple[dict[str, nn.Module], torch.Tensor]] = {}
        results = {}
        for name, module in group.items():
            if name in self.experts and count < self.stage.experts.min_tokens:
                results[name] = self.round(name, module, f"{count} calibration tokens")
                continue
            fmt = self.format_of(name)  # modules solved as one matrix share a format too
            if not self.shared.is_shared(module):
                buckets.setdefault(("own", fmt), ({}, H))[0][name] = module
                continue
            total = self.shared.add(module, H, count, block)
            if total is None:
                deferred.add(name)
            else:
                blocks = tuple(b for b, _ in self.shared.users[id(module)])  # same users: same summed Hessian
                buckets.setdefault((blocks, fmt), ({}, total))[0][name] = module
        for (users, _), (modules, hessian) in buckets.items():
            results.update(self._quantize(modules, hessian, cross if users == "own" else None))
        return results

    def _paired_pass(self, block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs,
                     tracker: InputTracker, observe: Callable | None = None) -> None:
        """Each window through the float block twice: from the float model's stream (its layers'
        inputs become the tracker's reference; the outputs move that stream on) and from the
        quantized model's stream (Hessians and cross products)."""
        watched = targets if self.stage.asymmetric else {}  # else (tune_target) only the float stream moves on
        for i in range(len(inputs)):
            seen: dict[str, torch.Tensor] = {}
            with input_hooks(watched, seen.__setitem__):
                run_block(block, self.reference.window(i), self.device, update=True, dtype=self.compute_dtype)
            tracker.reference = seen if watched else None
            with input_hooks(targets, tracker):
                run_block(block, inputs.window(i), self.device, dtype=self.compute_dtype, observe=observe)
            tracker.release()
        if tracker.unpaired:
            logger.info("asymmetric calibration skipped for %s (the float and quantized models route different "
                        "tokens to them)", ", ".join(sorted(tracker.unpaired)))

    def _float_inputs(self, block: nn.Module, leaders: dict[str, nn.Module],
                      windows: int) -> dict[str, list[torch.Tensor]]:
        """The float model's stream through the float block, window by window (moving that stream on);
        returns each leader's input in every window (on the offload device)."""
        seen: dict[str, list[torch.Tensor]] = {name: [] for name in leaders}
        store = self.reference.hidden.device
        with input_hooks(leaders, lambda name, x: seen[name].append(x.to(store))):
            for i in range(windows):
                run_block(block, self.reference.window(i), self.device, update=True, dtype=self.compute_dtype)
        return seen

    def _discover(self, block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs) -> InputTracker:
        """The block's groups in forward order, from one window (no statistics)."""
        discovery = InputTracker(accumulate=set())
        with input_hooks(targets, discovery):
            run_block(block, inputs.head(1), self.device, dtype=self.compute_dtype)
        return discovery

    def _one_pass(self, block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs, index: int,
                  deferred: set[str]) -> dict[str, GPTQResult]:
        """``true_sequential`` on chained inputs: all windows through the block in one call. A
        pre-hook on each group's first layer takes the group's Hessian (and, with asymmetric
        calibration, its cross product with the float model's inputs) from every window's input,
        solves the group, and lets the call go on with the quantized weights: later groups see
        inputs computed through the quantized earlier ones, and the call's outputs are the
        quantized block's (kept in ``block_outputs`` for the next block)."""
        discovery = self._discover(block, targets, inputs)
        groups = {leader: {name: targets[name] for name in discovery.groups[leader]} for leader in discovery.order}
        references = {}
        if self.reference is not None:  # asymmetric (tune, the other float-stream user, is not sequential)
            references = self._float_inputs(block, {leader: targets[leader] for leader in groups}, len(inputs))
        results: dict[str, GPTQResult] = {}

        def solve(leader: str, x: torch.Tensor) -> None:
            group = groups.pop(leader, None)
            if group is None:  # called again in the same pass (a layer used twice): solved already
                return
            reference = references.pop(leader, None)
            # Paired window by window, where each window brought this layer its own [1, ...] input
            # (not routed experts, whose tokens differ between the two models).
            paired = (reference is not None and x.dim() > 2 and len(reference) == x.shape[0]
                      and all(r.shape == (1, *x.shape[1:]) for r in reference))
            if self.reference is not None and not paired:
                logger.info("asymmetric calibration skipped for %s (the float and quantized models route different "
                            "tokens to it)", leader)
            H, count, cross = input_statistics(x, self.hessian_dtype, reference if paired else None)
            results.update(self._quantize_group(group, H, count, index, deferred, cross))

        handles = [targets[leader].register_forward_pre_hook(lambda module, args, leader=leader: solve(leader, args[0]))
                   for leader in groups]
        try:
            outputs = run_block_together(block, inputs, self.device, self.compute_dtype)
        finally:
            for handle in handles:
                handle.remove()
        self.block_outputs = outputs
        return results

    def _solve(self, tracker: InputTracker, targets: dict[str, nn.Module], index: int,
               deferred: set[str]) -> dict[str, GPTQResult]:
        """Solve every group the tracker accumulated. Over several processes (see
        :mod:`hfcompress.distributed`) the statistics are first averaged over all of them, each
        process solves its share of the groups, and every result goes to every process."""
        groups: dict[str, list[str]] = {}  # every process's groups (MoE routing may differ between them)
        for part in distributed.gathered(tracker.groups):
            for leader, names in part.items():
                groups.setdefault(leader, names)
        leaders = distributed.union_of([leader for leader in tracker.order if leader in tracker.hessians])
        unpaired = set(distributed.union_of(sorted(tracker.unpaired)))
        results: dict[str, GPTQResult] = {}
        solved: list[dict[str, GPTQResult]] = []
        for i, leader in enumerate(leaders):
            group = {name: targets[name] for name in groups[leader]}
            size = linear_shape(targets[leader])[0]
            H = tracker.hessians.pop(leader, None)  # dropped once solved: one block's Hessians, not all at once
            H, count = distributed.mean_over_ranks(H if H is not None else torch.zeros(size, size, device=self.device),
                                                   tracker.counts.get(leader, 0))
            cross = None
            if self.reference is not None and self.stage.asymmetric and leader not in unpaired:
                D = tracker.cross.get(leader)
                cross = distributed.mean_over_ranks(D if D is not None else torch.zeros_like(H),
                                                    tracker.counts.get(leader, 0))[0] + H
            mine = distributed.owner(i) == distributed.rank()
            solved.append(self._quantize_group(group, H, count, index, deferred, cross) if mine else {})
        for i, leader in enumerate(leaders):
            part = distributed.share_from(distributed.owner(i), solved[i])
            if distributed.owner(i) != distributed.rank():
                for name, result in part.items():  # this process computes on with the owner's result
                    _set_weight(targets[name], result.weight)
            results.update(part)
        return results

    def _tune(self, block: nn.Module, targets: dict[str, nn.Module], results: dict[str, GPTQResult],
              inputs: BlockInputs, outputs: torch.Tensor, index: int) -> None:
        """Tune the group scales of the block's solved linear layers to its output (``tune``
        epochs, :mod:`.block_tuning`); the target moves ``tune_target`` (default: ``asymmetric``)
        of the way from the float block's outputs on these inputs to the float model's own."""
        toward = self.stage.tune_toward_float
        if self.reference is not None and toward:
            outputs = outputs.lerp_(self.reference.hidden.to(outputs.device, outputs.dtype), toward)
        names = {name: targets[name] for name, r in results.items()
                 if name not in self.rounded and isinstance(targets[name], nn.Linear)}
        if not names:
            return
        norms = [m.weight for m in block.modules()  # the block's norms: one-dimensional float weights
                 if self.stage.tune_norms and not isinstance(m, nn.Linear)
                 and isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 1
                 and m.weight.is_floating_point()]
        tuned, before, after = tune_block_scales(block, names, {n: results[n].weight for n in names}, inputs, outputs,
                                                 self.device, self.stage.tune, self.stage.tune_lr, self.compute_dtype,
                                                 norms, self.stage.tune_codes)
        for name, weight in tuned.items():
            results[name].weight = weight
            _set_weight(targets[name], weight)
        logger.info("layer %d: block output error %.3e in the first epoch of scale tuning, %.3e in the last",
                    index + 1, before, after)

    def quantize_block(self, block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs,
                       index: int = 0) -> dict[str, GPTQResult]:
        """GPTQ every module of ``targets`` (names relative to ``block``, block number ``index``), in
        place; returns results. Shared modules whose last user is a later block are left for then."""
        results: dict[str, GPTQResult] = {}
        deferred: set[str] = set()
        self.block_outputs = None
        if self.stage.true_sequential and inputs.calls is None and not distributed.active():
            results.update(self._one_pass(block, targets, inputs, index, deferred))
        elif self.stage.true_sequential:
            discovery = self._discover(block, targets, inputs)
            for leader in discovery.order:
                group = discovery.groups[leader]
                tracker = InputTracker(accumulate={leader}, compute_dtype=self.hessian_dtype)
                with input_hooks(targets, tracker, stop_after=group[-1]):
                    run_block(block, inputs, self.device, dtype=self.compute_dtype)
                tracker.release()
                results.update(self._solve(tracker, targets, index, deferred))
        else:
            tracker = InputTracker(compute_dtype=self.hessian_dtype)
            outputs: list[torch.Tensor] = []  # the float block's outputs on these inputs (tune's target)
            observe = (lambda x, out: outputs.append(out.detach().to(inputs.hidden.device, torch.float32))
                       ) if self.stage.tune else None
            if self.reference is None:
                with input_hooks(targets, tracker):
                    run_block(block, inputs, self.device, dtype=self.compute_dtype, observe=observe)
            else:
                self._paired_pass(block, targets, inputs, tracker, observe)
            tracker.release()
            results.update(self._solve(tracker, targets, index, deferred))
            if self.stage.tune:
                self._tune(block, targets, results, inputs, torch.cat(outputs), index)
        for name in sorted(set(targets) - set(results) - deferred):  # never called by the forward pass
            results[name] = self.round(name, targets[name], "never reached by the calibration forward pass")
            self.block_outputs = None  # computed with its float weight: the walk runs the block again
        return results


@torch.no_grad()
def quantize_gptq(
    model: nn.Module,
    stage: QuantizeStage,
    targets: dict[str, nn.Module],
    windows: torch.Tensor,
    record: Callable[[str, LinearFormat], None],
    resume: ResumeState | None = None,
    device: torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """GPTQ the ``targets`` inside the model's blocks; returns the names left for the caller.

    ``record(name, format)`` is called for every module replaced by a QuantLinear. Targets outside
    the blocks (an ``lm_head`` asked for) are returned untouched.
    """
    blocks = decoder_blocks(model)
    owners = {id(module): name for name, module in targets.items()}
    users: dict[int, list[tuple[int, str]]] = {}  # every block that uses a target, and under which name
    expert_names: dict[int, set[str]] = {}
    for b, block in enumerate(blocks):
        for short, module in block.named_modules(remove_duplicate=False):
            if id(module) in owners:
                users.setdefault(id(module), []).append((b, short))
            if isinstance(module, ExpertLinears):
                expert_names.setdefault(b, set()).update(
                    f"{short}.{n}" for n, m in module.named_modules() if id(m) in owners)
    per_block: dict[int, dict[str, nn.Module]] = {}
    for module_id, uses in users.items():
        for b, short in uses:
            per_block.setdefault(b, {})[short] = targets[owners[module_id]]
    outside = [name for name, module in targets.items() if id(module) not in users]
    shared = SharedHessians({k: v for k, v in users.items() if len(v) > 1})
    if shared.users and resume is not None:
        raise ValueError("resume_dir: resuming GPTQ is not supported for models whose layers share weights (their "
                         "Hessians span several layers); run without resume_dir")

    if distributed.active():
        if shared.users:
            raise ValueError("GPTQ over several processes does not support layers that share weights across blocks "
                             "(their Hessians span blocks); run it in one process")
        if resume is not None:
            logger.warning("GPTQ over %d processes keeps no resume checkpoints", distributed.world())
            resume = None
        windows = distributed.local_windows(windows)
        logger.info("process %d of %d calibrates on %d windows", distributed.rank(), distributed.world(), len(windows))
    if stage.asymmetric and shared.users:
        raise ValueError("asymmetric: calibration against the float model is not supported with layers that share "
                         "weights across blocks; set asymmetric: 0 (or drop the share stage)")
    if stage.tune and shared.users:
        raise ValueError("tune: block-wise scale tuning is not supported with layers that share weights across blocks "
                         "(a block would retune what earlier blocks used); set tune: 0 (or drop the share stage)")
    if stage.asymmetric and stage.true_sequential and distributed.active():
        raise ValueError("asymmetric: with true_sequential, calibration against the float model runs in one process "
                         "(over several, each group is calibrated in its own pass without the float stream); set "
                         "true_sequential: false or run GPTQ in one process")
    if stage.tune and distributed.active():
        raise ValueError("tune: block-wise scale tuning runs in one process (each process would tune to its own "
                         "windows); set tune: 0 or run GPTQ in one process")
    if stage.tune_norms and resume is not None:
        logger.warning("tune_norms: this GPTQ stage keeps no resume checkpoints (they hold the packed layers, not "
                       "the tuned norms)")
        resume = None
    if stage.float_stream and resume is not None:
        # A checkpoint holds the quantized stream only; the float stream beside it would be lost.
        logger.warning("%s: this GPTQ stage keeps no resume checkpoints (an interrupted run starts it over)",
                       "asymmetric" if stage.asymmetric else "tune_target")
        resume = None
    start = resume.done() if resume is not None else 0

    def restore(hidden):
        for name, fmt in resume.restore(model, hidden).items():
            record(name, fmt)

    pending: dict[int, tuple] = {}  # block -> (its packed linears, its targets), installed after the block's pass

    def install(step) -> dict[str, QuantLinear]:
        """Swap the block's quantized linears for packed ones (every layer that shares one gets it)."""
        qlinears, targets_here = pending.pop(step.index)
        packed = {}
        for short, qlinear in qlinears.items():
            module = targets_here[short]
            packed[f"{step.name}.{short}"] = qlinear
            for user, user_short in users[id(module)]:
                blocks[user].set_submodule(user_short, qlinear)
            record(owners[id(module)], qlinear.format)
        return packed

    def checkpoint(step):
        # After the walk has run the windows through the block: the next block's inputs come from
        # the float linears holding the dequantized weights (what GPTQ's error feedback assumed),
        # not from whichever packed kernel the device would pick.
        packed = install(step)
        if resume is not None:
            resume.save(step.index, packed, step.inputs.hidden)

    progress = tqdm(total=len(blocks), desc=f"GPTQ {stage.bits}-bit", unit="layer", initial=start)
    rounded: dict[str, str] = {}
    reference_hidden = None  # the float model's hidden states at the current block (asymmetric)
    run_device = device or home_device(model)
    for step in walk_blocks(model, windows, device, compute_dtype, start=start, restore=restore, after=checkpoint):
        b, block = step.index, step.block
        targets_here = per_block.get(b, {})
        reference = None
        if stage.tune and step.reached and step.inputs.calls is not None:
            raise CalibrationError(f"tune: {type(model).__name__}'s blocks take token-dependent inputs (the calibration "
                                   "replays the model), which block-wise scale tuning does not support; set tune: 0")
        if stage.float_stream and step.reached:
            if step.inputs.calls is not None:  # tune's own refusal above covers tune_target
                raise CalibrationError(f"asymmetric: {type(model).__name__}'s blocks take token-dependent inputs (the "
                                       "calibration replays the model), so no float stream runs beside the quantized "
                                       "one; set asymmetric: 0")
            if reference_hidden is None:
                reference_hidden = step.inputs.hidden.clone()
            reference = BlockInputs(reference_hidden, step.inputs.kwargs, step.inputs.args)
            if not targets_here:  # nothing to calibrate here, but the float stream moves on
                run_block(block, reference, run_device, update=True, dtype=compute_dtype)
        formats = {short: stage.linear_format(owners[id(module)]) for short, module in targets_here.items()}
        quantizer = GPTQBlockQuantizer(stage, run_device, compute_dtype, shared,
                                       frozenset(expert_names.get(b, ())), reference, formats)
        experts = [m for m in block.modules() if isinstance(m, ExpertLinears)]
        for module in experts:
            module.calibrate_all = stage.experts.calibrate_all
        try:
            if not step.reached:  # the model skips it for text: round what it holds rather than leave it float
                results = {short: quantizer.round(short, module, "its block is not reached by the forward pass")
                           for short, module in targets_here.items()}
            else:
                results = quantizer.quantize_block(block, targets_here, step.inputs, b) if targets_here else {}
        finally:
            for module in experts:
                module.calibrate_all = False
        if quantizer.block_outputs is not None:  # the walk's pass ran already, inside quantize_block
            step.inputs.hidden.copy_(quantizer.block_outputs)
            step.outputs_written = True
            quantizer.block_outputs = None
        # Packed now (an eighth of the unpacked codes' memory); swapped in once the windows have run
        # through the block's float linears, which hold the dequantized weights.
        pending[b] = ({short: QuantLinear.from_quantized(r.weight, targets_here[short].bias, formats[short])
                       for short, r in results.items()}, targets_here)
        for r in results.values():
            r.weight = None  # the unpacked codes: the packed layers hold them now
        if not step.reached:  # no pass through it follows, so no checkpoint either
            install(step)
        rounded.update({f"{step.name}.{short}": why for short, why in quantizer.rounded.items()})
        progress.update(1)
        if results:
            errors = ", ".join(f"{short} {r.error:.2e}" for short, r in results.items())
            logger.info("layer %d/%d: relative reconstruction error %s", b + 1, len(blocks), errors)
            progress.set_postfix(error=f"{sum(r.error for r in results.values()) / len(results):.2e}")
    progress.close()
    if rounded:
        logger.warning("%d modules could not be calibrated and were rounded to nearest (RTN): %s", len(rounded),
                       "; ".join(f"{name} ({why})" for name, why in rounded.items()))
    return outside
