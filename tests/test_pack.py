"""Bit packing: round trips for every width and ragged length, against a naive bit-stream model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.quantization.pack import (
    pack_columns,
    pack_rows,
    packed_length,
    unpack_columns,
    unpack_rows,
)


def naive_pack_column(values: list[int], bits: int) -> list[int]:
    """The layout by definition: value j's bit t is stream bit j*bits + t."""
    words = [0] * packed_length(len(values), bits)
    for j, v in enumerate(values):
        for t in range(bits):
            if (v >> t) & 1:
                p = j * bits + t
                words[p // 32] |= 1 << (p % 32)
    return [w - 2**32 if w >= 2**31 else w for w in words]


@st.composite
def codes(draw):
    bits = draw(st.sampled_from([2, 3, 4, 8]))
    rows = draw(st.integers(1, 130))
    cols = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    return bits, torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.int32)


@settings(max_examples=60, deadline=None)
@given(codes())
def test_pack_rows_round_trip_and_matches_bit_stream(case):
    bits, values = case
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (packed_length(values.shape[0], bits), values.shape[1])
    assert torch.equal(unpack_rows(packed, bits, values.shape[0]), values)
    for col in range(values.shape[1]):
        assert packed[:, col].tolist() == naive_pack_column(values[:, col].tolist(), bits)


@settings(max_examples=30, deadline=None)
@given(codes())
def test_pack_columns_round_trip(case):
    bits, values = case
    values = values.t().contiguous()  # [G, N]: pack along N
    packed = pack_columns(values, bits)
    assert packed.shape == (values.shape[0], packed_length(values.shape[1], bits))
    assert torch.equal(unpack_columns(packed, bits, values.shape[1]), values)


def test_known_words_match_the_gptq_layout():
    # 4 bits: eight values per word, v0 in the lowest nibble.
    assert pack_rows(torch.arange(8).view(8, 1), 4).item() & 0xFFFFFFFF == 0x76543210
    # 8 bits: four values per word.
    assert pack_rows(torch.tensor([[1], [2], [3], [255]]), 8).item() & 0xFFFFFFFF == 0xFF030201
    # 3 bits: value 10 straddles words 0 and 1 (two low bits at 30-31, the high bit at bit 0 of word 1).
    values = torch.zeros(32, 1, dtype=torch.int32)
    values[10] = 0b111
    words = pack_rows(values, 3).view(-1).tolist()
    assert [w & 0xFFFFFFFF for w in words] == [0b11 << 30, 1, 0]


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_width_is_refused(bits):
    with pytest.raises(ValueError, match="valid: 2, 3, 4, 8"):
        pack_rows(torch.zeros(8, 1, dtype=torch.int32), bits)


def test_values_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_rows(torch.tensor([[16]]), 4)


def test_wrong_packed_shape_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_rows(torch.zeros(3, 2, dtype=torch.int32), 4, rows=8)
