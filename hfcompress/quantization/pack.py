"""The one place that knows how low-bit integers sit inside int32 words (the GPTQ layout).

Values are packed along one dimension (the rows of the input) as a little-endian bit stream:
value ``j`` occupies stream bits ``[j * bits, (j + 1) * bits)``, and stream bit ``p`` is bit
``p % 32`` of word ``p // 32``. Every column is packed on its own. For 2, 4 and 8 bits a value
never straddles two words; for 3 bits it sometimes does, exactly as in GPTQ's 3-bit layout::

    bits = 4, 8 values per word (v0 in the lowest nibble):
        word 0 = | v7 | v6 | v5 | v4 | v3 | v2 | v1 | v0 |
                  31                               3  0
    bits = 3, 32 values per 3 words (v10 and v21 straddle):
        word 0 = |v10 lo 2| v9 | v8 | ... | v1 | v0 |
        word 1 = |v21 lo 1| v20 | ... | v12 | v11 |v10 hi 1|
        word 2 = | v31 | v30 | ... | v23 | v22 |v21 hi 2|

``K`` values take ``ceil(K * bits / 32)`` words; bits past the last value are zero. The weight
matrix ``qweight`` is ``[ceil(K * bits / 32), N]`` (packed along the input dimension K), and the
zero points ``qzeros`` are ``[n_groups, ceil(N * bits / 32)]`` (packed along the output dimension):
use :func:`pack_rows` for the first and :func:`pack_columns` for the second.

>>> import torch
>>> v = torch.arange(8).reshape(8, 1)
>>> hex(pack_rows(v, bits=4).item() & 0xFFFFFFFF)
'0x76543210'
>>> torch.equal(unpack_rows(pack_rows(v, 4), 4, rows=8), v.int())
True
"""

from __future__ import annotations

import math

import torch

from ..linear_format import SUPPORTED_BITS  # noqa: F401 (defined with the storage format)
_VALUES_PER_BLOCK = 32  # 32 values of b bits fill exactly b words, for every b


def packed_length(length: int, bits: int) -> int:
    """Number of int32 words that hold ``length`` values of ``bits`` bits."""
    return math.ceil(length * bits / 32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; valid: {', '.join(map(str, SUPPORTED_BITS))}")


def _stream_positions(bits: int):
    """For each value of a 32-value block: (word, bit offset, bits that spill into the next word)."""
    for j in range(_VALUES_PER_BLOCK):
        word, offset = divmod(j * bits, 32)
        yield j, word, offset, max(0, offset + bits - 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``[0, 2**bits)`` along dim 0: ``[K, N]`` -> int32 ``[ceil(K*bits/32), N]``."""
    _check_bits(bits)
    if values.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    if values.numel():
        low, high = torch.aminmax(values)
        if int(low) < 0 or int(high) >= 2**bits:
            raise ValueError(f"values must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    if 32 % bits == 0:
        # No value straddles two words: shift each into its place and add them up in int32 (the
        # fields are disjoint, so the sum is their OR; the top field wraps into the sign bit,
        # which is the bit pattern wanted).
        per_word = 32 // bits
        words = packed_length(rows, bits)
        v = values.to(torch.int32)
        if words * per_word != rows:
            v = torch.nn.functional.pad(v, (0, 0, 0, words * per_word - rows))
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
        return (v.view(words, per_word, cols) << shifts[None, :, None]).sum(1, dtype=torch.int32)
    v = values.to(torch.int64)
    blocks = math.ceil(rows / _VALUES_PER_BLOCK)
    v = torch.nn.functional.pad(v, (0, 0, 0, blocks * _VALUES_PER_BLOCK - rows))
    v = v.view(blocks, _VALUES_PER_BLOCK, cols)
    words = torch.zeros(blocks, bits, cols, dtype=torch.int64, device=values.device)
    for j, word, offset, spill in _stream_positions(bits):
        words[:, word] |= v[:, j] << offset
        if spill:
            words[:, word + 1] |= v[:, j] >> (bits - spill)
    return _to_int32(words.view(blocks * bits, cols)[: packed_length(rows, bits)])


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: int32 ``[ceil(rows*bits/32), N]`` -> int32 ``[rows, N]``."""
    _check_bits(bits)
    if packed.dim() != 2 or packed.shape[0] != packed_length(rows, bits):
        raise ValueError(
            f"packed tensor of shape {tuple(packed.shape)} cannot hold {rows} rows of {bits} bits "
            f"(expected {packed_length(rows, bits)} words per column)"
        )
    cols = packed.shape[1]
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        # No value straddles two words: one shift per position in the word, all words at once
        # (an arithmetic shift of a negative word only fills bits that the mask drops).
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        values = (packed.to(torch.int32).unsqueeze(1) >> shifts[None, :, None]) & mask
        return values.reshape(-1, cols)[:rows]
    blocks = math.ceil(rows / _VALUES_PER_BLOCK)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 0, 0, blocks * bits - words.shape[0]))
    words = words.view(blocks, bits, cols)
    out = torch.empty(blocks, _VALUES_PER_BLOCK, cols, dtype=torch.int64, device=packed.device)
    for j, word, offset, spill in _stream_positions(bits):
        value = words[:, word] >> offset
        if spill:
            value = value | (words[:, word + 1] << (bits - spill))
        out[:, j] = value & mask
    return out.view(blocks * _VALUES_PER_BLOCK, cols)[:rows].to(torch.int32)


def pack_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along dim 1: ``[G, N]`` -> int32 ``[G, ceil(N*bits/32)]`` (the ``qzeros`` layout)."""
    return pack_rows(values.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`."""
    return unpack_rows(packed.t(), bits, columns).t().contiguous()
