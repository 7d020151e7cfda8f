"""GPTQ maths on tiny tensors: closed forms, a brute-force optimum, dead inputs, groups, orders."""

import itertools
import logging

import pytest
import torch

from hfcompress.quantization.grid import find_scale_zero, quantize
from hfcompress.quantization.gptq import accumulate_hessian, find_scale_zero_mse, gptq_quantize
from hfcompress.quantization.rtn import quantize_rtn
from hfcompress.recipe import QuantizeStage, RecipeError


def hessian(X):
    return accumulate_hessian(torch.zeros(X.shape[1], X.shape[1]), X, 0)[0]


def quad_error(W, Q, H):
    d = Q - W
    return float(torch.sum((d @ H) * d))


def test_running_hessian_equals_the_batch_formula():
    X = torch.randn(100, 8, dtype=torch.float64).float()
    H, n = torch.zeros(8, 8), 0
    for chunk in X.split(17):
        H, n = accumulate_hessian(H, chunk, n)
    assert n == 100
    assert torch.allclose(H, 2 / 100 * X.t() @ X, atol=1e-5)


def test_two_columns_follow_the_closed_form_update():
    torch.manual_seed(0)
    W, X = torch.randn(6, 2), torch.randn(50, 2) @ torch.tensor([[1.0, 0.8], [0.0, 0.6]])
    H = hessian(X)
    damp = 1e-6
    result = gptq_quantize(W, H, bits=3, group_size=-1, sym=False, damp=damp, static_groups=True)
    scale, zero = find_scale_zero(W, 3, sym=False)
    scale = result.weight.scales[0].float()
    Hd = H + damp * torch.diag(H).mean() * torch.eye(2)
    q0 = quantize(W[:, :1], scale, zero, 7)[:, 0]
    w1 = W[:, 1] + Hd[1, 0] * (W[:, 0] - scale * (q0 - zero)) / Hd[1, 1]  # least squares given column 0
    q1 = quantize(w1[:, None], scale, zero, 7)[:, 0]
    assert torch.equal(result.weight.q[:, 0], q0.int()) and torch.equal(result.weight.q[:, 1], q1.int())


def test_close_to_the_brute_force_optimum_and_better_than_rounding():
    gptq_ratio, rtn_ratio = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(1, 5, generator=g)
        X = torch.randn(40, 5, generator=g) @ torch.randn(5, 5, generator=g)  # correlated inputs
        H = hessian(X)
        result = gptq_quantize(W, H, bits=2, group_size=-1, sym=False, damp=1e-6, static_groups=True)
        scale, zero = result.weight.scales[0].float(), result.weight.zeros[0].float()
        levels = scale * (torch.arange(4.0) - zero)
        best = min(quad_error(W, torch.tensor([codes]), H)
                   for codes in itertools.product(levels.tolist(), repeat=5))
        rtn = scale * (quantize(W, scale, zero, 3) - zero)
        gptq_ratio.append(quad_error(W, result.weight.dequantize(), H) / best)
        rtn_ratio.append(quad_error(W, rtn, H) / best)
    assert min(gptq_ratio) >= 1 - 1e-4  # nothing beats the exhaustive optimum
    # GPTQ is greedy: usually at or near the optimum, far closer than rounding.
    assert sorted(gptq_ratio)[6] < 1.3 < sorted(rtn_ratio)[6]
    assert sum(g <= r + 1e-6 for g, r in zip(gptq_ratio, rtn_ratio)) >= 8


def test_reported_error_is_the_relative_output_error():
    torch.manual_seed(1)
    W, X = torch.randn(16, 32), torch.randn(200, 32)
    result = gptq_quantize(W, hessian(X), bits=4, group_size=16, sym=True)
    dW = result.weight.dequantize() - W
    expected = float((X @ dW.t()).pow(2).sum() / (X @ W.t()).pow(2).sum())
    assert result.error == pytest.approx(expected, rel=1e-3)


def test_dead_inputs_are_zeroed():
    torch.manual_seed(2)
    W, X = torch.randn(4, 8), torch.randn(30, 8)
    X[:, 3] = 0
    result = gptq_quantize(W, hessian(X), bits=4, group_size=-1, sym=True)
    assert torch.equal(result.weight.dequantize()[:, 3], torch.zeros(4))


@pytest.mark.parametrize("static", [False, True])
def test_act_order_groups_and_ragged_last_group(static):
    torch.manual_seed(3)
    W, X = torch.randn(8, 100), torch.randn(300, 100) * torch.linspace(0.1, 3, 100)
    result = gptq_quantize(W, hessian(X), bits=4, group_size=32, sym=False, act_order=True, static_groups=static)
    qw = result.weight
    assert qw.scales.shape == (4, 8)  # 32 + 32 + 32 + a short group of 4
    counts = torch.bincount(qw.g_idx.long(), minlength=4).tolist()
    assert counts == [32, 32, 32, 4]
    natural = torch.arange(100) // 32
    assert torch.equal(qw.g_idx.long(), natural) == static  # static groups keep natural order
    assert result.error < 0.05


def test_failed_cholesky_raises_the_dampening(caplog):
    v = torch.randn(6)
    H = torch.outer(v, v)
    H -= 0.02 * torch.diag(H).mean() * torch.eye(6)  # rank one, pushed slightly indefinite by round-off
    with caplog.at_level(logging.WARNING):
        result = gptq_quantize(torch.randn(3, 6), H, bits=4, group_size=-1, sym=True, damp=0.01)
    assert result.damp > 0.01 and "Cholesky" in caplog.text


def test_mse_clipping_search_lowers_weight_error():
    torch.manual_seed(4)
    w = torch.randn(64, 128)
    w[:, 0] *= 8  # an outlier per row makes the full range wasteful
    full = find_scale_zero(w, 4, sym=True)
    searched = find_scale_zero_mse(w, 4, sym=True)
    err = lambda sz: (sz[0][:, None] * (quantize(w, *sz, 15) - sz[1][:, None]) - w).abs().pow(2.4).sum()  # noqa: E731
    assert err(searched) < err(full)
    assert bool((searched[0] <= full[0] + 1e-7).all())  # only ever shrinks the range


def test_weighted_clipping_search_protects_high_energy_columns():
    """With column weights, the search trades error in low-energy columns for high-energy ones."""
    torch.manual_seed(6)
    w = torch.randn(64, 32)
    w[:, 0] *= 6  # an outlier column that sees almost no input
    energy = torch.ones(32)
    energy[0] = 1e-3
    plain = find_scale_zero_mse(w, 3, sym=True)
    weighted = find_scale_zero_mse(w, 3, sym=True, column_weight=energy)

    def err(sz):
        return ((sz[0][:, None] * (quantize(w, *sz, 7) - sz[1][:, None]) - w).abs().pow(2.4) * energy).sum()

    assert err(weighted) < 0.9 * err(plain)


def test_wider_clipping_search_reaches_a_large_positive_weight():
    """A symmetric 3-bit grid's levels run -4..3 steps: its full range ``max|w|`` tops out at 6/7 of
    a largest weight that is positive. With ``grow = 7/6`` the search can put its top level on it
    (what SmolLM2's massive-activation ``down_proj`` rows need, benchmarks/README.md), and its
    error is never above the plain search's (it measures a superset of the ranges)."""
    torch.manual_seed(8)
    w = torch.randn(64, 64) * 0.01
    w[:, 5] = 1.0  # one dominant weight per row, positive
    err = lambda sz: (sz[0][:, None] * (quantize(w, *sz, 7) - sz[1][:, None]) - w).abs().pow(2.4).sum(1)  # noqa: E731
    plain = find_scale_zero_mse(w, 3, sym=True)
    wider = find_scale_zero_mse(w, 3, sym=True, grow=7 / 6)
    assert bool((err(wider) <= err(plain)).all()) and float(err(wider).sum()) < 0.5 * float(err(plain).sum())
    top = wider[0] * (quantize(w, *wider, 7)[:, 5] - wider[1])  # the dominant weight, dequantized
    assert torch.allclose(top, torch.ones(64), atol=0.01)
    assert bool((plain[0] * 3 < 0.9).all())  # the plain search's top level clips it
    assert torch.equal(find_scale_zero_mse(w, 3, sym=True, grow=1.0)[0], plain[0])


def test_better_than_rtn_on_correlated_inputs():
    torch.manual_seed(5)
    W = torch.randn(64, 128)
    X = torch.randn(1000, 16) @ torch.randn(16, 128) + 0.1 * torch.randn(1000, 128)
    result = gptq_quantize(W, hessian(X), bits=3, group_size=64, sym=True)
    rtn = quantize_rtn(W, 3, 64, True).dequantize()
    assert quad_error(W, result.weight.dequantize(), hessian(X)) < 0.5 * quad_error(W, rtn, hessian(X))


def test_stacked_rows_get_exactly_their_own_result():
    torch.manual_seed(6)
    W1, W2, X = torch.randn(8, 64), torch.randn(5, 64), torch.randn(200, 64)
    H = hessian(X)
    stacked = gptq_quantize(torch.cat([W1, W2]), H, bits=4, group_size=32, sym=False, act_order=True, shrink=0.5)
    alone = gptq_quantize(W2, H, bits=4, group_size=32, sym=False, act_order=True, shrink=0.5)
    part = stacked.weight.rows(8, 13)
    assert torch.equal(part.q, alone.weight.q) and torch.equal(part.scales, alone.weight.scales)
    assert torch.equal(part.zeros, alone.weight.zeros) and torch.equal(part.g_idx, alone.weight.g_idx)


@pytest.mark.parametrize("sym,bits,budget", [(True, 4, 1 << 26), (False, 3, 1 << 26), (True, 3, 5000)])
def test_clipping_search_equals_measuring_each_shrunk_range(sym, bits, budget):
    """All candidates at once (and in chunks, with a small budget) give bit for bit the grids of
    the scan that measures the range of ``w * p`` candidate by candidate, ties keeping the wider."""
    torch.manual_seed(7)
    w = torch.randn(48, 64) * 0.03 + (0 if sym else 0.01)
    w[:, 3] *= 5
    w[5] = 0  # an empty row keeps a usable scale
    w[9] = (w[9] * 100).round() / 100  # values on a coarse grid: several shrink factors tie
    energy = torch.rand(64) + 0.1
    scale, zero = find_scale_zero_mse(w, bits, sym, column_weight=energy, budget=budget)
    maxq = 2**bits - 1
    best_scale, best_zero = find_scale_zero(w, bits, sym)
    best_err = torch.full((48,), float("inf"))
    for i in range(80):
        s, z = find_scale_zero(w * (1 - i / 100), bits, sym)
        err = ((s[:, None] * (quantize(w, s, z, maxq) - z[:, None]) - w).abs() ** 2.4 * energy).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
    assert torch.equal(scale, best_scale) and torch.equal(zero, best_zero)
    assert bool((scale > 0).all())


@pytest.mark.parametrize("bits", [3, 4])
def test_clipping_search_with_a_stride_refines_around_the_coarse_best(bits):
    """``step=4``: every 4th range, then the 3 on either side of each row's best; each row's error
    is the least over exactly those ranges, never worse than the coarse grid's, and mostly the
    full search's own."""
    torch.manual_seed(bits)
    w, energy, maxq = torch.randn(200, 64) * 0.03, torch.rand(64) + 0.1, 2**bits - 1
    errors, scales = [], []
    for i in range(80):
        s, z = find_scale_zero(w * (1 - i / 100), bits, True)
        errors.append(((s[:, None] * (quantize(w, s, z, maxq) - z[:, None]) - w).abs() ** 2.4 * energy).sum(1))
        scales.append(s)
    errors, scales = torch.stack(errors), torch.stack(scales)  # [80, rows]
    coarse = errors[::4].argmin(0) * 4
    window = (coarse[None] + torch.arange(-3, 4)[:, None]).clamp(0, 79)
    expected = window.gather(0, errors.gather(0, window).argmin(0)[None])[0]
    scale, _ = find_scale_zero_mse(w, bits, True, column_weight=energy, step=4)
    rows = torch.arange(200)
    assert torch.equal(scale, scales[expected, rows])
    chosen = errors[expected, rows]
    assert bool((chosen <= errors[coarse, rows]).all()) and bool((chosen >= errors.min(0).values).all())
    assert float((chosen == errors.min(0).values).float().mean()) > 0.8


def test_recipe_checks_the_wider_clipping_search():
    with pytest.raises(RecipeError, match=r"mse_grow: 0.9 must lie in \[1, 2\]"):
        QuantizeStage.from_dict({"method": "gptq", "mse": True, "mse_grow": 0.9})
    with pytest.raises(RecipeError, match="mse_grow: widens the clipping search; set mse: true"):
        QuantizeStage.from_dict({"method": "gptq", "mse_grow": 1.17})
    assert QuantizeStage.from_dict({"method": "gptq", "mse": True, "mse_grow": 1.17}).mse_grow == 1.17
