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
import torch.nn.functional as F

from .grid import QuantizedWeight, find_scale_zero, group_count, group_index, quantize, round_scale


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype: torch.dtype = torch.float16
) -> QuantizedWeight:
    """Quantize ``w`` ``[N, K]`` group by group along K (short last group allowed).

    All groups at once: ``w`` is viewed as ``[N * groups, width]`` rows (a short last group padded
    with zeros, which move no range: every grid spans 0), one grid per row.
    """
    n, k = w.shape
    maxq = 2**bits - 1
    width = k if group_size == -1 else group_size
    groups = group_count(k, group_size)
    padded = F.pad(w.float(), (0, groups * width - k)) if groups * width != k else w.float()
    rows = padded.reshape(n * groups, width)
    scale, zero = find_scale_zero(rows, bits, sym)
    scale = round_scale(scale, scale_dtype)
    q = quantize(rows, scale, zero, maxq).reshape(n, groups * width)[:, :k].to(torch.int32)
    scales = scale.reshape(n, groups).t().to(scale_dtype).contiguous()
    zeros = zero.reshape(n, groups).t().to(torch.int32).contiguous()
    return QuantizedWeight(q.contiguous(), scales, zeros, group_index(k, group_size, w.device), bits, group_size, sym)
