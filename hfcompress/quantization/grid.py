"""The integer grid that weights are rounded onto: scale and zero point per group, pure maths.

A weight ``w`` maps to ``q = clamp(round(w / scale) + zero, 0, maxq)`` with ``maxq = 2**bits - 1``
and back to ``scale * (q - zero)``. Zero points are integers (the GPTQ convention), so a
quantized row is fully described by ``q``, one scale and one zero per group.

- asymmetric: the grid spans ``[min(w, 0), max(w, 0)]``;
- symmetric: it spans ``[-a, a]`` with ``a = max|w|`` and the zero point is ``(maxq + 1) / 2``
  (8 for 4 bits), as in the reference GPTQ code.

Groups run along the input dimension: columns ``[g * G, (g + 1) * G)`` of a ``[N, K]`` weight
share a scale. When ``G`` does not divide ``K`` the last group is shorter (SmolLM2: K = 576,
G = 128 gives four groups of 128 and one of 64). ``group_size = -1`` means one group per row.

>>> import torch
>>> w = torch.tensor([[-1.0, 0.5, 1.0]])
>>> scale, zero = find_scale_zero(w, bits=4, sym=True)
>>> q = quantize(w, scale, zero, maxq=15)
>>> dequantize(q, scale, zero)
tensor([[-0.9333,  0.5333,  0.9333]])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def group_count(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (the last one may be short)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """int32 ``[K]``: the group of each input column, in natural (not act-order) order."""
    columns = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(columns) if group_size == -1 else columns // group_size


def find_scale_zero(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``w`` ``[N, k]`` -> (``[N]`` float32, ``[N]`` float32)."""
    low, high = torch.aminmax(w.float(), dim=1)  # one pass over w instead of two
    return scale_zero_of_range(low, high, bits, sym)


def scale_zero_of_range(low: torch.Tensor, high: torch.Tensor, bits: int,
                        sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the grids whose weights span ``[low, high]`` (float32 tensors
    of any one shape; the grid always holds 0)."""
    maxq = 2**bits - 1
    zero_col = torch.zeros_like(low)
    wmin = torch.minimum(low, zero_col)
    wmax = torch.maximum(high, zero_col)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    # An all-zero row still needs a usable (non-zero) scale.
    empty = (wmin == 0) & (wmax == 0)
    wmin = torch.where(empty, -1.0, wmin)
    wmax = torch.where(empty, 1.0, wmax)
    scale = (wmax - wmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype (kept as float32), never to zero.

    Codes are computed against the rounded scale, so that what reload dequantizes is exactly
    what the quantizer chose.
    """
    info = torch.finfo(dtype)
    return scale.to(dtype).float().clamp_min(info.tiny * info.eps)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``w`` ``[N, k]`` onto the grid of per-row ``scale``/``zero`` ``[..., N]`` (leading dims:
    several grids at once); returns float codes ``[..., N, k]``."""
    return torch.round(w.float() / scale[..., None]).add_(zero[..., None]).clamp_(0, maxq)  # in place: one buffer


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``w`` ``[N, K]`` rounded group by group onto its grid and back, all groups at once (the
    grids of :func:`quantize_rtn`, scales kept in float32): for searches that round many times.
    A short last group is padded with zeros, which move no group's range (it always spans 0)."""
    n, k = w.shape
    width = k if group_size == -1 else group_size
    groups = -(-k // width)
    padded = F.pad(w.float(), (0, groups * width - k)).reshape(n * groups, width)
    scale, zero = find_scale_zero(padded, bits, sym)
    q = quantize(padded, scale, zero, 2**bits - 1)
    return ((q - zero[:, None]) * scale[:, None]).reshape(n, groups * width)[:, :k]


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grid codes back to weights: ``scale * (q - zero)`` with per-row ``scale``/``zero``."""
    return scale[:, None] * (q.float() - zero[:, None])


@dataclass
class QuantizedWeight:
    """A weight on the grid, unpacked: what every quantization method produces.

    ``q``: integer ``[N, K]`` codes (int32, or uint8 as GPTQ gives them: a quarter of the memory);
    ``scales``: ``[n_groups, N]`` (in their storage dtype); ``zeros``: int32 ``[n_groups, N]``;
    ``g_idx``: int32 ``[K]`` group of each input column (differs from natural order only with
    act-order).
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows ``[start, stop)``: rows are quantized independently, so this is their own result."""
        return QuantizedWeight(self.q[start:stop], self.scales[:, start:stop], self.zeros[:, start:stop],
                               self.g_idx, self.bits, self.group_size, self.sym)

    def dequantize(self) -> torch.Tensor:
        """float32 ``[N, K]``."""
        N, K = self.q.shape
        G = K if self.group_size == -1 else self.group_size
        n_groups = self.scales.shape[0]
        if torch.equal(self.g_idx, group_index(K, self.group_size, self.g_idx.device)):
            # Groups are runs of G columns: broadcast each group's scale and zero over its run
            # instead of gathering one per weight (several times faster on CPU).
            q = torch.nn.functional.pad(self.q.float(), (0, n_groups * G - K)).view(N, n_groups, G)
            w = (q - self.zeros.t().float().unsqueeze(-1)) * self.scales.t().float().unsqueeze(-1)
            return w.view(N, n_groups * G)[:, :K]
        g = self.g_idx.long()
        return (self.q.float() - self.zeros.t()[:, g].float()) * self.scales.t()[:, g].float()
