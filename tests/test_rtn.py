"""The grid and RTN: ragged groups, symmetric and asymmetric grids, stored scales."""

import pytest
import torch

from hfcompress.quantization.grid import find_scale_zero, group_count, group_index, quantize
from hfcompress.quantization.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 100])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_is_bounded_by_the_step(bits, group_size, sym):
    torch.manual_seed(bits * 1000 + group_size)
    w = torch.randn(12, 200)
    qw = quantize_rtn(w, bits, group_size, sym)
    assert qw.q.shape == (12, 200) and qw.scales.shape == (group_count(200, group_size), 12)
    assert int(qw.q.min()) >= 0 and int(qw.q.max()) <= 2**bits - 1
    step = qw.scales.float().t()[:, qw.g_idx.long()]
    err = (qw.dequantize() - w).abs() / step
    # Inside the grid rounding costs at most half a step; at its ends, the integer zero point (or
    # the symmetric grid's extra negative level) can clip by up to one step.
    assert float(err.max()) <= 1.0 + 1e-4
    assert float(err.mean()) < 0.3  # uniform rounding error averages a quarter step


def test_ragged_last_group_gets_its_own_scale():
    w = torch.ones(2, 576)
    w[:, 512:] = 10.0  # only the short last group (64 columns) holds large values
    qw = quantize_rtn(w, 4, 128, sym=True)
    assert qw.scales.shape == (5, 2)
    assert group_index(576, 128)[-1].item() == 4
    assert float(qw.scales[4, 0]) > 5 * float(qw.scales[0, 0])
    assert torch.allclose(qw.dequantize(), w, rtol=0.1)


def test_all_zero_rows_are_exact():
    qw = quantize_rtn(torch.zeros(3, 64), 4, 32, sym=False)
    assert torch.equal(qw.dequantize(), torch.zeros(3, 64))


def test_scales_are_stored_in_their_dtype_and_codes_agree_with_them():
    torch.manual_seed(1)
    w = torch.randn(64, 512)  # enough weights that some sit where the two scales round differently
    qw = quantize_rtn(w, 4, 32, sym=False, scale_dtype=torch.float16)
    assert qw.scales.dtype == torch.float16
    # The codes are the original weight rounded against the scales as stored (float16), not
    # against the float32 scales they were computed from: reload then dequantizes what was chosen.
    for g in range(16):
        cols = slice(32 * g, 32 * (g + 1))
        codes = quantize(w[:, cols], qw.scales[g].float(), qw.zeros[g].float(), 15)
        assert torch.equal(codes.int(), qw.q[:, cols].int())


def test_symmetric_zero_point_is_the_middle_of_the_grid():
    scale, zero = find_scale_zero(torch.randn(4, 16), bits=4, sym=True)
    assert torch.equal(zero, torch.full((4,), 8.0))
