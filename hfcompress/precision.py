"""Compute precision: which dtype a forward pass computes in, and computing a lower-precision
model in float32 without copying it.

A bfloat16 model on a CPU without bf16 instructions runs emulated bf16 kernels, several times
slower than float32 (measured on a 2-core AMD EPYC with AVX2: a SmolLM2 forward of 2048 tokens
takes 31.5 s in bfloat16 and 5.4 s in float32). Autocast cannot raise precision, so float32
compute raises the weights in place, a block at a time, and lowers them back after: the model's
memory barely grows and its stored weights do not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .residency import home_device, store_of

LOW_PRECISION = (torch.bfloat16, torch.float16)


def native_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` in hardware (bfloat16 on a CPU needs AVX-512 BF16 or
    AMX; without them it is emulated)."""
    if dtype not in LOW_PRECISION:
        return True
    if device.type == "cuda":
        return dtype != torch.bfloat16 or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        if dtype == torch.bfloat16:
            return torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True  # other accelerators: trust the dtype the model was loaded in


def resolve_compute_dtype(name: str | None, model_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype to compute in (``None``: the model's own) for a dtype name, ``auto`` or ``None``.

    ``auto``: the model's own where the device computes it natively, else float32. bfloat16 or
    float16: autocast. float32 on a lower-precision model: its weights raised, a block at a time.
    """
    if name == "auto":
        dtype = model_dtype if native_precision(model_dtype, device) else torch.float32
    else:
        dtype = getattr(torch, name) if name else None
    return None if dtype == model_dtype else dtype


def model_compute_dtype(model: nn.Module, name: str | None, device: torch.device | None = None) -> torch.dtype | None:
    """:func:`resolve_compute_dtype` for ``model`` (its first floating-point weight's dtype), computed
    on ``device`` (default: where that weight is; the CPU for a model whose weights are on disk)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return None
    # A disk-backed model rests on the meta device and reads each unit in as it computes.
    if store_of(model) is None and any(p.is_meta for p in model.parameters()):
        return None  # weights offloaded (accelerate brings them in per forward): they cannot be raised in place
    return resolve_compute_dtype(name, weight.dtype, device or home_device(model))


def _raise(module: nn.Module, skip: set[int] = frozenset()) -> dict[str, torch.dtype]:
    """Raise ``module``'s lower-precision floating parameters and buffers to float32 in place
    (``skip``: ids of tensors to leave); returns their names and dtypes."""
    raised: dict[str, torch.dtype] = {}
    # Ordinary tensors even inside inference_mode (evaluation runs there): inference tensors could
    # not be trained later, and on the meta device (a model resting on disk) .data refuses them.
    with torch.inference_mode(False):
        for prefix, child in module.named_modules(remove_duplicate=False):
            for store in (child._parameters, child._buffers):
                for key, tensor in store.items():
                    if tensor is not None and tensor.dtype in LOW_PRECISION and id(tensor) not in skip:
                        raised.setdefault(f"{prefix}.{key}" if prefix else key, tensor.dtype)
                        tensor.data = tensor.data.float()
    return raised


def _lower(module: nn.Module, raised: dict[str, torch.dtype]) -> None:
    """Lower what :func:`_raise` raised, by name: tensors a stage put there since keep their dtype."""
    with torch.inference_mode(False):  # as in _raise
        for prefix, child in module.named_modules(remove_duplicate=False):
            for store in (child._parameters, child._buffers):
                for key, tensor in store.items():
                    dtype = raised.get(f"{prefix}.{key}" if prefix else key)
                    if tensor is not None and dtype is not None and tensor.dtype == torch.float32:
                        tensor.data = tensor.data.to(dtype)


@contextmanager
def float32_block(block: nn.Module) -> Iterator[None]:
    """Compute ``block`` in float32: its lower-precision floating parameters and buffers are raised in
    place and lowered back on exit (those still there, by name: layers a stage replaced inside keep
    their own storage, e.g. the float16 scales of a quantized linear)."""
    raised = _raise(block)
    try:
        yield
    finally:
        _lower(block, raised)


def _float32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in LOW_PRECISION else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


@contextmanager
def float32_forward(model: nn.Module, blocks: list[nn.Module]) -> Iterator[None]:
    """Forward passes of ``model`` computed in float32: what lies outside ``blocks`` (embeddings,
    final norm, output projection) is raised for the whole context, each block only while it runs
    (its floating inputs raised too). At most one block's weights are in float32 at a time."""
    inside = {id(t) for block in blocks for t in [*block.parameters(), *block.buffers()]}
    states: dict[int, dict[str, torch.dtype]] = {}

    def enter(block, args, kwargs):
        states[id(block)] = _raise(block)
        return _float32(args), _float32(kwargs)

    def leave(block, args, kwargs, output):  # also when the forward raised (always_call)
        if id(block) in states:
            _lower(block, states.pop(id(block)))

    handles = [h for block in blocks for h in (block.register_forward_pre_hook(enter, with_kwargs=True),
                                               block.register_forward_hook(leave, with_kwargs=True, always_call=True))]
    raised = _raise(model, skip=inside)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _lower(model, raised)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite: the extremes tell (min and max propagate NaN), in one
    read of the tensor and without the boolean copy ``isfinite`` makes (20x faster on CPU)."""
    if tensor.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(tensor)
    except NotImplementedError:  # float8: neither aminmax nor isfinite has a kernel for it
        return bool(torch.isfinite(tensor.float()).all())
    return bool(torch.isfinite(low) & torch.isfinite(high))
