"""The CPU fast path: torch's own packed int4 / int8 matmuls, fed by a one-time repack.

- 4-bit: ``aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zero)`` computes
  ``x @ w^T`` with ``w = (q - 8) * scale + offset`` per group of ``group`` in {32, 64, 128, 256}
  input columns. Our grid is ``w = scale * (q - z)``, which is the same line with
  ``offset = scale * (8 - z)``. Groups that are multiples of an allowed size repeat their scale
  (one group of 576 is nine groups of 64 with equal scales: exact); a short last group is padded
  with columns that meet zeros in ``x``, and N is padded to the packer's multiple of 16.
- 8-bit, one group per row: ``aten._weight_int8pack_mm(x, int8, scale)`` computes
  ``x @ (scale * int8)^T``; with ``int8 = q - 128`` an asymmetric zero point adds a rank-one
  correction ``- sum_k x[m, k] * scale[n] * (z[n] - 128)``.

Both are fast for bfloat16 activations only (float32 and float16 hit a generic path 20-40x
slower than ``nn.Linear``), so the dispatcher sends only bfloat16 here. Everything else (2/3
bits, grouped 8-bit) stays on the reference path. The repack happens once per module; the
checkpoint format never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT4_GROUPS = (256, 128, 64, 32)
_INT4_N_MULTIPLE = 16  # the packer wants N to be a multiple of 16


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


@dataclass
class Int4Weight:
    packed: torch.Tensor  # what _convert_weight_to_int4pack_for_cpu returns
    scales: torch.Tensor  # float32 [K_padded / group, N]
    offsets: torch.Tensor  # float32 [K_padded / group, N]
    group: int  # the kernel's group, in INT4_GROUPS
    in_features: int
    padded: int  # K after padding
    out_features: int  # N before padding
    _per_dtype: dict

    def scale_and_zero(self, dtype: torch.dtype) -> torch.Tensor:
        """``[K_padded / group, N, 2]`` in ``dtype``, the layout the kernel reads (cached per dtype)."""
        if dtype not in self._per_dtype:
            self._per_dtype[dtype] = torch.stack([self.scales, self.offsets], dim=-1).to(dtype).contiguous()
        return self._per_dtype[dtype]


def _kernel_group(span: int) -> int | None:
    """The largest group the kernel takes that divides ``span`` (so it repeats the stored scales exactly)."""
    return next((g for g in INT4_GROUPS if span % g == 0), None)


def prepare_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Int4Weight | None:
    """Repack codes ``q [N, K]`` with ``scales``/``zeros [G, N]`` for the int4 kernel, or None.

    Groups must be contiguous runs of K (act-order layers are permuted first by the caller).
    """
    if not int4_available():
        return None
    N, K = q.shape
    if group_size == -1:  # one stored group: any kernel group repeats it, K is padded to a multiple
        group = _kernel_group(K) or INT4_GROUPS[-1]
        padded = -(-K // group) * group
        stored = torch.zeros(padded // group, dtype=torch.long)
    else:
        group = _kernel_group(group_size)
        if group is None:
            return None
        padded = -(-K // group_size) * group_size  # whole stored groups: a short last one is padded
        stored = torch.arange(0, padded, group) // group_size
    padded_n = -(-N // _INT4_N_MULTIPLE) * _INT4_N_MULTIPLE
    s = torch.zeros(padded // group, padded_n)
    z = torch.full((padded // group, padded_n), 8.0)
    s[:, :N] = scales.float()[stored]
    z[:, :N] = zeros.float()[stored]
    # Padding: code 8 with offset s * (8 - z); padded columns meet zeros in x, padded rows are cut off.
    codes = torch.full((padded_n, padded), 8, dtype=torch.int32)
    codes[:N, :K] = q.int()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return Int4Weight(packed, s.contiguous(), (s * (8 - z)).contiguous(), group, K, padded, N, {})


def int4_matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    """``x [M, K] @ w^T -> [M, N]`` in ``x.dtype`` (float32, bfloat16 or float16)."""
    if weight.padded != weight.in_features:
        x = F.pad(x, (0, weight.padded - weight.in_features))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight.packed, weight.group,
                                                    weight.scale_and_zero(x.dtype))
    return y if y.shape[1] == weight.out_features else y[:, : weight.out_features]


@dataclass
class Int8Weight:
    codes: torch.Tensor  # int8 [N, K]: q - 128
    scales: torch.Tensor  # float32 [N]
    correction: torch.Tensor | None  # float32 [N]: scale * (z - 128), None when symmetric
    _per_dtype: dict

    def scales_as(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._per_dtype:
            self._per_dtype[dtype] = self.scales.to(dtype)
        return self._per_dtype[dtype]


def prepare_int8(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Int8Weight | None:
    """Repack 8-bit codes with one group per row (``scales``/``zeros [1, N]``), or None."""
    # torch's int8 matmul reads the inner dimension 8 columns at a time and crashes (SIGSEGV in
    # torch 2.13, for more than one row of x) when in_features is not a multiple of 8.
    if not int8_available() or scales.shape[0] != 1 or q.shape[1] % 8:
        return None
    s, z = scales[0].float(), zeros[0].float()
    correction = None if bool((z == 128).all()) else (s * (z - 128)).contiguous()
    return Int8Weight((q.int() - 128).to(torch.int8).contiguous(), s.contiguous(), correction, {})


def int8_matmul(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight.codes, weight.scales_as(x.dtype))
    if weight.correction is not None:
        y = y - (x.float().sum(-1, keepdim=True) * weight.correction).to(y.dtype)
    return y
