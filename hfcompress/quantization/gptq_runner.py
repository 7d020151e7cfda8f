"""GPTQ's lifecycle: calibration hooks, shared Hessians, the block-by-block loop, resume.

The maths is in ``gptq.py``; this file decides which inputs feed which Hessian and in what order
layers are quantized:

- linear layers that read the same input tensor (q/k/v, gate/up) share one Hessian, found by
  identity of the input tensor while the block runs, so no per-family list is needed;
- with ``true_sequential`` the groups of a block are quantized in the order the forward pass
  reaches them, each with a Hessian of inputs computed through the already quantized groups
  (the forward stops right after the group, so later layers cost nothing);
- after a block is quantized the calibration windows run through it again, and its quantized
  outputs feed the next block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import BlockInputs, capture_block_inputs, input_hooks, run_block
from ..models import decoder_blocks, linear_weight
from ..recipe import QuantizeStage
from ..resume import ResumeState
from .gptq import GPTQResult, accumulate_hessian, gptq_quantize, relative_error
from .qlinear import LinearFormat, QuantLinear

logger = logging.getLogger(__name__)


class InputTracker:
    """Accumulates one Hessian per distinct input tensor and learns which layers share it."""

    def __init__(self, accumulate: set[str] | None = None, compute_dtype: torch.dtype | None = None):
        self.accumulate = accumulate  # leaders to accumulate for (None: all)
        self.compute_dtype = compute_dtype
        self.order: list[str] = []  # group leaders, in the order the forward pass reaches them
        self.groups: dict[str, list[str]] = {}
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
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
            H = self.hessians.get(name)
            if H is None:
                H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
            self.hessians[name], self.counts[name] = accumulate_hessian(H, x, self.counts.get(name, 0),
                                                                        self.compute_dtype)

    def release(self) -> None:
        self._last = None


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Make ``module`` compute with ``weight`` ``[out, in]`` (what its QuantLinear will compute)."""
    target = linear_weight(module)
    target.data.copy_(weight.to(target.dtype))


class GPTQBlockQuantizer:
    """Quantizes the targeted linear layers of one block at a time."""

    def __init__(self, stage: QuantizeStage, device: torch.device, compute_dtype: torch.dtype | None = None):
        self.stage = stage
        self.device = device
        self.compute_dtype = compute_dtype
        self.format = LinearFormat(bits=stage.bits, group_size=stage.group_size, sym=stage.sym,
                                   act_order=stage.act_order and not stage.static_groups)

    def _quantize(self, modules: dict[str, nn.Module], H: torch.Tensor) -> dict[str, GPTQResult]:
        """GPTQ for modules that share the Hessian ``H``, solved as one matrix.

        Rows of ``W`` are quantized independently given ``H`` (their own scales, their own error
        feedback), so stacking the modules' rows gives each module exactly its own result while
        the column loop runs once instead of once per module.
        """
        s = self.stage
        weights = [linear_weight(m).detach().float() for m in modules.values()]
        H = H.to(weights[0].device)
        stacked = gptq_quantize(torch.cat(weights), H, s.bits, s.group_size, s.sym, damp=s.damp,
                                block_size=s.block_size, act_order=s.act_order, static_groups=s.static_groups,
                                mse=s.mse, shrink=s.shrink, scale_dtype=self.format.torch_scale_dtype)
        results, start = {}, 0
        for (name, module), W in zip(modules.items(), weights):
            part = stacked.weight.rows(start, start + W.shape[0])
            start += W.shape[0]
            dequantized = part.dequantize()
            # W may share storage with the module's weight (a float32 model): measure before writing.
            results[name] = GPTQResult(part, stacked.damp, relative_error(W, dequantized, H))
            _set_weight(module, dequantized)
        return results

    def quantize_block(self, block: nn.Module, targets: dict[str, nn.Module], inputs: BlockInputs) -> dict[str, GPTQResult]:
        """GPTQ every module of ``targets`` (names relative to ``block``), in place; returns results."""
        results: dict[str, GPTQResult] = {}
        if self.stage.true_sequential:
            discovery = InputTracker(accumulate=set())
            with input_hooks(targets, discovery):
                run_block(block, BlockInputs(inputs.hidden[:1], inputs.kwargs), self.device, dtype=self.compute_dtype)
            for leader in discovery.order:
                group = discovery.groups[leader]
                tracker = InputTracker(accumulate={leader}, compute_dtype=self.compute_dtype)
                with input_hooks(targets, tracker, stop_after=group[-1]):
                    run_block(block, inputs, self.device, dtype=self.compute_dtype)
                tracker.release()
                results.update(self._quantize({name: targets[name] for name in group}, tracker.hessians[leader]))
        else:
            tracker = InputTracker(compute_dtype=self.compute_dtype)
            with input_hooks(targets, tracker):
                run_block(block, inputs, self.device, dtype=self.compute_dtype)
            tracker.release()
            for leader in tracker.order:
                group = {name: targets[name] for name in tracker.groups[leader]}
                results.update(self._quantize(group, tracker.hessians[leader]))
        missing = set(targets) - set(results)
        if missing:
            raise RuntimeError(f"the calibration forward pass never reached {sorted(missing)}")
        return results


def _block_of(name: str, block_names: list[str]) -> int | None:
    for i, prefix in enumerate(block_names):
        if name.startswith(prefix + "."):
            return i
    return None


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
    offload = next(model.parameters()).device
    device = device or offload
    block_names = [name for name, module in model.named_modules() if any(module is b for b in blocks)]
    per_block: dict[int, dict[str, nn.Module]] = {}
    outside = []
    for name, module in targets.items():
        index = _block_of(name, block_names)
        if index is None:
            outside.append(name)
        else:
            per_block.setdefault(index, {})[name] = module

    inputs = capture_block_inputs(model, blocks[0], windows, device, offload)
    start = resume.done() if resume is not None else 0
    if start:
        for name, fmt in resume.restore(model, inputs.hidden).items():
            record(name, fmt)
    quantizer = GPTQBlockQuantizer(stage, device, compute_dtype)
    progress = tqdm(range(start, len(blocks)), desc=f"GPTQ {stage.bits}-bit", unit="layer", initial=start,
                    total=len(blocks))
    for b in progress:
        block = blocks[b].to(device)
        prefix = block_names[b] + "."
        targets_here = {name.removeprefix(prefix): module for name, module in per_block.get(b, {}).items()}
        results = quantizer.quantize_block(block, targets_here, inputs) if targets_here else {}
        # The next block sees this block's quantized outputs.
        run_block(block, inputs, device, update=True, dtype=compute_dtype)
        packed = {}
        for short, result in results.items():
            module = targets_here[short]
            packed[prefix + short] = QuantLinear.from_quantized(result.weight, module.bias, quantizer.format)
            block.set_submodule(short, packed[prefix + short])
            record(prefix + short, quantizer.format)
        blocks[b].to(offload)
        if results:
            errors = ", ".join(f"{short} {r.error:.2e}" for short, r in results.items())
            logger.info("layer %d/%d: relative reconstruction error %s", b + 1, len(blocks), errors)
            progress.set_postfix(error=f"{sum(r.error for r in results.values()) / len(results):.2e}")
        if resume is not None:
            resume.save(b, packed, inputs.hidden)
    return outside
