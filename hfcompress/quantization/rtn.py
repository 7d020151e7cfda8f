"""Round-to-nearest (RTN) weight quantization: every group onto its own grid, no data needed.

>>> import torch
>>> w = torch.randn(16, 100)
>>> qw = quantize_rtn(w, bits=4, group_size=32, sym=True)
>>> qw.scales.shape, qw.q.shape          # 4 groups: 32 + 32 + 32 + a short one of 4
(torch.Size([4, 16]), torch.Size([16, 100]))
>>> bool((qw.dequantize() - w).abs().max() < 0.5)
True
"""

from __future__ import annotations

import torch

from .grid import QuantizedWeight, find_scale_zero, group_count, group_index, quantize, round_scale


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> QuantizedWeight:
    """Quantize ``w`` ``[N, K]`` group by group along K (short last group allowed)."""
    n, k = w.shape
    maxq = 2**bits - 1
    width = k if group_size == -1 else group_size
    q = torch.empty(n, k, dtype=torch.int32, device=w.device)
    scales = torch.empty(group_count(k, group_size), n, dtype=scale_dtype, device=w.device)
    zeros = torch.empty(group_count(k, group_size), n, dtype=torch.int32, device=w.device)
    for g, start in enumerate(range(0, k, width)):
        block = w[:, start : start + width].float()
        scale, zero = find_scale_zero(block, bits, sym)
        scale = round_scale(scale, scale_dtype)
        q[:, start : start + width] = quantize(block, scale, zero, maxq).to(torch.int32)
        scales[g] = scale.to(scale_dtype)
        zeros[g] = zero.to(torch.int32)
    return QuantizedWeight(q, scales, zeros, group_index(k, group_size, w.device), bits, group_size, sym)
