"""The compressed-tensors ``pack-quantized`` layout of our packed linears, both ways.

compressed-tensors stores each quantized linear per output row; ours (the GPTQ layout,
``quantization/pack.py``) per input column. The codes are the same numbers, so every tensor is a
transpose, bit for bit (``K = in_features``, ``N = out_features``, ``G`` groups)::

    ours                                      compressed-tensors
    qweight  int32 [ceil(K*b/32), N]    <->   weight_packed      int32 [N, ceil(K*b/32)]
    scales   scale_dtype [G, N]         <->   weight_scale       [N, G]
    qzeros   int32 [G, ceil(N*b/32)]    <->   weight_zero_point  int32 [ceil(N*b/32), G]  (asymmetric only)
    -                                         weight_shape       int64 [N, K]

compressed-tensors writes its codes as signed values offset by ``2**(b-1)``, which is exactly our
unsigned code; a symmetric grid has no zero-point tensor there, because its zero point is that
same offset (our ``qzeros`` hold ``2**(b-1)`` everywhere). The library reads 4 and 8 bits packed
this way (vLLM's kernels serve those two); our 3-bit words straddle, which its layout does not,
and act-order group indices are no longer read by it, so both stay out (:func:`refusal`).

The config is built with the library's own classes (``QuantizationConfig``, ``QuantizationScheme``,
``QuantizationArgs``), not by hand.
"""

from __future__ import annotations

import re

import torch

from ..quantization.grid import group_count
from ..quantization.pack import pack_columns, packed_length

BITS = (4, 8)
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def refusal(fmt: dict, in_features: int, name: str) -> str | None:
    """Why a linear stored as ``fmt`` (a LinearFormat dict) cannot be written in this layout; None if it can."""
    if fmt["bits"] not in BITS:
        return (f"{name}: compressed-tensors packs {' and '.join(map(str, BITS))}-bit weights; this model has "
                f"{fmt['bits']}-bit ones")
    if fmt.get("act_order"):
        return (f"{name}: act-order group indices (g_idx) are not read by compressed-tensors; quantize with "
                "act_order: true and static_groups: true, which keeps the groups in natural order")
    group_size = fmt["group_size"]
    if group_size != -1 and in_features % group_size:
        return (f"{name}: in_features {in_features} is not a multiple of group_size {group_size} (a short last "
                "group), which compressed-tensors cannot hold; quantize with a group size that divides every "
                "layer (e.g. 64 for SmolLM2)")
    return None


def _reader_scales(scales: torch.Tensor, model_dtype: torch.dtype | None) -> torch.Tensor:
    """Scales in the model's dtype, which readers dequantize in, where that loses nothing (float16
    into float32); else as stored (float16 into bfloat16 would round them)."""
    if model_dtype is None or not model_dtype.is_floating_point:
        return scales
    cast = scales.to(model_dtype)
    return cast if torch.equal(cast.to(scales.dtype), scales) else scales


def to_pack_quantized(tensors: dict, name: str, fmt: dict, in_features: int,
                      model_dtype: torch.dtype | None = None) -> dict:
    """The compressed-tensors tensors of the packed linear ``name`` (our tensors in ``tensors``)."""
    out = {
        f"{name}.weight_packed": tensors[f"{name}.qweight"].t().contiguous(),
        f"{name}.weight_scale": _reader_scales(tensors[f"{name}.scales"], model_dtype).t().contiguous(),
        f"{name}.weight_shape": torch.tensor([tensors[f"{name}.qweight"].shape[1], in_features], dtype=torch.int64),
    }
    if not fmt["sym"]:
        out[f"{name}.weight_zero_point"] = tensors[f"{name}.qzeros"].t().contiguous()
    if f"{name}.bias" in tensors:
        out[f"{name}.bias"] = tensors[f"{name}.bias"]
    return out


def from_pack_quantized(tensors: dict, fmt: dict) -> dict:
    """Our buffers (``qweight``, ``scales``, ``qzeros``) from one linear's compressed-tensors tensors
    (keys without the module prefix)."""
    n, k = (int(v) for v in tensors["weight_shape"].tolist())
    bits = fmt["bits"]
    if tensors.get("weight_zero_point") is not None:
        qzeros = tensors["weight_zero_point"].t().contiguous()
    else:
        offset = torch.full((group_count(k, fmt["group_size"]), n), 2 ** (bits - 1), dtype=torch.int32)
        qzeros = pack_columns(offset, bits).to(tensors["weight_packed"].device)
    scale_dtype = getattr(torch, fmt.get("scale_dtype", "float16"))
    out = {"qweight": tensors["weight_packed"].t().contiguous(),
           "scales": tensors["weight_scale"].t().to(scale_dtype).contiguous(), "qzeros": qzeros}
    assert out["qweight"].shape[0] == packed_length(k, bits), "weight_shape does not match weight_packed"
    return out


def quantization_config(groups: list[tuple[dict, list[str]]], other_names: dict[str, str] | None = None) -> dict:
    """The ``quantization_config`` of a pack-quantized model: one config group per ``(fmt, modules)``.

    Targets name each module exactly (so linears left in float stay out without an ignore list),
    under its name in the files and, where transformers renames it on load (``other_names``), under
    that name too: vLLM matches the first, transformers the second."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    other_names = other_names or {}
    schemes = {}
    for i, (fmt, modules) in enumerate(groups):
        group_size = fmt["group_size"]
        weights = QuantizationArgs(
            num_bits=fmt["bits"], type="int", symmetric=bool(fmt["sym"]),
            strategy="channel" if group_size == -1 else "group", group_size=None if group_size == -1 else group_size,
        )
        targets = [f"re:^{re.escape(m)}$" for m in modules] + [f"re:^{re.escape(other_names[m])}$"
                                                              for m in modules if m in other_names]
        schemes[f"group_{i}"] = QuantizationScheme(targets=targets, weights=weights, format="pack-quantized")
    config = QuantizationConfig(config_groups=schemes, format="pack-quantized",
                                quantization_status=QuantizationStatus.COMPRESSED, ignore=[])
    return {**config.model_dump(mode="json"), "quant_method": "compressed-tensors"}


def expect_pack_quantized(module: torch.nn.Module) -> None:
    """Give a packed linear (built empty, before the weights load) the compressed-tensors buffers
    of its shape in place of ours, so that a compressed-tensors checkpoint loads into it."""
    fmt = module.format
    n, k, bits = module.out_features, module.in_features, fmt.bits
    device, groups = module.qweight.device, group_count(module.in_features, fmt.group_size)
    for name in ("qweight", "qzeros", "scales"):
        del module._buffers[name]
    module.register_buffer("weight_packed", torch.zeros(n, packed_length(k, bits), dtype=torch.int32, device=device))
    # The file's scales may be wider than ours (see _reader_scales); restore_native narrows them back.
    module.register_buffer("weight_scale", torch.zeros(n, groups, dtype=torch.float32, device=device))
    module.register_buffer("weight_shape", torch.zeros(2, dtype=torch.int64, device=device))
    if not fmt.sym:
        module.register_buffer("weight_zero_point",
                               torch.zeros(packed_length(n, bits), groups, dtype=torch.int32, device=device))


def restore_native(module: torch.nn.Module) -> None:
    """Turn the loaded compressed-tensors buffers of ``module`` back into ours (exact transposes)."""
    parts = {suffix: module._buffers.pop(suffix, None) for suffix in SUFFIXES}
    if list(parts["weight_shape"].tolist()) != [module.out_features, module.in_features]:
        raise ValueError(f"weight_shape {parts['weight_shape'].tolist()} does not match the layer "
                         f"[{module.out_features}, {module.in_features}]")
    for name, tensor in from_pack_quantized(parts, module.format.to_dict()).items():
        module.register_buffer(name, tensor)
    module._kernel = None
