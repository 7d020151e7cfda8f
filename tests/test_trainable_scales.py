"""Trainable group scales, zero points and codes (quantization-aware training that stays packed)."""

import pytest
import torch
import torch.nn.functional as F

from hfcompress.quantization.grid import QuantizedWeight
from hfcompress.quantization.qlinear import CODE_GAIN, TRAINABLE_CODES, TRAINABLE_SCALES, TRAINABLE_ZEROS, LinearFormat, \
    QuantLinear, moved_codes
from hfcompress.quantization.rtn import quantize_rtn
from hfcompress.quantization.trainable import freeze_scales, make_scales_trainable, project_codes


def _layer(bits=4, group_size=32, sym=False, act_order=False, in_features=100, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, 24, bias=bias)
    qw = quantize_rtn(linear.weight.detach(), bits, group_size, sym)
    if act_order:  # a permuted grouping: column perm[i] belongs to group i // group_size
        perm = torch.randperm(in_features)
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // group_size
        qw = QuantizedWeight(qw.q, qw.scales, qw.zeros, g_idx, bits, group_size, sym)
    fmt = LinearFormat(bits, group_size, sym, act_order=act_order)
    return QuantLinear.from_quantized(qw, linear.bias, fmt)


@pytest.mark.parametrize("bits, group_size, sym, act_order", [
    (4, 32, False, False), (3, 32, True, False), (4, 32, False, True), (8, -1, False, False), (2, 48, False, False)])
def test_scale_and_zero_gradients_match_autograd_through_the_dequantized_weight(bits, group_size, sym, act_order):
    module = _layer(bits, group_size, sym, act_order)
    params = make_scales_trainable(module)
    assert len(params) == (1 if sym else 2) and all(p.dtype == torch.float32 for p in params)
    x = torch.randn(3, 7, 100, requires_grad=True)
    target = torch.randn(3, 7, 24)
    log_scales = getattr(module, TRAINABLE_SCALES)
    with torch.no_grad():  # a clearly different scale per group, so that each group's gradient differs
        log_scales.add_(torch.linspace(-0.2, 0.2, log_scales.numel()).view_as(log_scales))
    loss = F.mse_loss(module(x), target)
    loss.backward()

    # The same loss by autograd through an explicit dequantization (a float copy of the weight).
    codes = module.unpack()
    scales = log_scales.detach().exp().requires_grad_()
    zeros = (getattr(module, TRAINABLE_ZEROS) if not sym else codes.zeros.float()).detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    rounded = zeros + (zeros.round() - zeros).detach()  # straight through the rounding
    weight = QuantizedWeight(codes.q, scales, rounded, codes.g_idx, bits, group_size, sym).dequantize()
    F.mse_loss(F.linear(x2, weight, module.bias), target).backward()

    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(log_scales.grad, scales.grad * scales.detach())  # d/dlog s = s d/ds
    assert log_scales.grad.abs().sum() > 0
    if not sym:
        torch.testing.assert_close(getattr(module, TRAINABLE_ZEROS).grad, zeros.grad)
        assert zeros.grad.abs().sum() > 0
    assert not any(name.endswith("weight") for name, _ in module.named_parameters())  # no float weight


def test_training_the_scales_fits_a_target_and_freezing_keeps_what_was_trained():
    torch.manual_seed(1)
    teacher = torch.nn.Linear(64, 16, bias=False)
    qw = quantize_rtn(teacher.weight.detach(), 3, 32, sym=False)
    module = QuantLinear.from_quantized(qw, None, LinearFormat(3, 32, False))
    x = torch.randn(256, 64)
    with torch.no_grad():  # scales off by up to 40% (round-to-nearest's are already near their best)
        module.scales.mul_(torch.empty_like(module.scales, dtype=torch.float32).uniform_(0.6, 1.4).half())
        start = F.mse_loss(module(x), teacher(x)).item()
    optimizer = torch.optim.Adam(make_scales_trainable(module), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        F.mse_loss(module(x), teacher(x).detach()).backward()
        optimizer.step()
    with torch.no_grad():
        trained = module(x)
        end = F.mse_loss(trained, teacher(x)).item()
    assert end < 0.5 * start  # the error heals without touching a code

    q_before = module.qweight.clone()
    assert freeze_scales(module) == 1
    assert module.scales.dtype == torch.float16 and "scales" in dict(module.named_buffers())
    assert not hasattr(module, TRAINABLE_SCALES) and not hasattr(module, TRAINABLE_ZEROS)
    assert not list(module.parameters())  # nothing trainable, nothing float is left
    assert torch.equal(module.qweight, q_before)  # the codes never changed
    with torch.no_grad():
        frozen = module(x)
    # The scales rounded to float16: the frozen layer computes what it trained to, up to that rounding.
    torch.testing.assert_close(frozen, trained, rtol=2e-3, atol=2e-3)
    assert F.mse_loss(frozen, teacher(x)).item() < 0.5 * start
    zeros = module.unpack().zeros
    assert zeros.dtype == torch.int32 and zeros.min() >= 0 and zeros.max() <= 7


def test_evaluation_while_training_uses_the_current_scales_not_a_stale_kernel():
    module = _layer(4, 32, sym=True, in_features=128, bias=False).to(torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        original = module(x)  # builds the CPU kernel with the stored scales
    make_scales_trainable(module)
    with torch.no_grad():
        getattr(module, TRAINABLE_SCALES).add_(torch.log(torch.tensor(2.0)))
        doubled = module(x)
    torch.testing.assert_close(doubled, 2 * original, rtol=2e-2, atol=2e-2)
    freeze_scales(module)
    with torch.no_grad():
        torch.testing.assert_close(module(x), doubled, rtol=2e-2, atol=2e-2)


def test_saving_scales_in_training_is_refused_until_they_are_frozen(tmp_path):
    from conftest import tiny_llama

    import hfcompress
    from hfcompress.errors import UserError

    model = hfcompress.compress(tiny_llama(), {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
    make_scales_trainable(model)
    with pytest.raises(UserError, match="scales in training; call .*freeze_scales"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    freeze_scales(model)
    model.save_pretrained(tmp_path / "a")


def test_a_zero_point_pushed_off_the_grid_computes_what_freezing_stores():
    module = _layer(3, 32, sym=False, bias=False)
    make_scales_trainable(module)
    with torch.no_grad():
        getattr(module, TRAINABLE_ZEROS)[0].fill_(11.6)  # past the 3-bit grid's top code, 7
        getattr(module, TRAINABLE_ZEROS)[1].fill_(-2.2)
    x = torch.randn(5, 100)
    with torch.no_grad():
        trained = module(x)
    freeze_scales(module)
    zeros = module.unpack().zeros
    assert zeros[0].eq(7).all() and zeros[1].eq(0).all()
    with torch.no_grad():
        torch.testing.assert_close(module(x), trained)


@pytest.mark.parametrize("bits, group_size, sym, act_order", [(3, 32, True, False), (4, 32, False, True), (2, 48, False, False)])
def test_code_gradients_pass_straight_through_the_rounding_of_the_moved_codes(bits, group_size, sym, act_order):
    module = _layer(bits, group_size, sym, act_order)
    params = make_scales_trainable(module, codes=True)
    offsets = getattr(module, TRAINABLE_CODES)
    assert offsets.shape == (24, 100) and params[-1] is offsets
    with torch.no_grad():  # about a third of the codes moved a step, up or down
        offsets.uniform_(-1 / CODE_GAIN, 1 / CODE_GAIN)
    x = torch.randn(3, 7, 100)
    target = torch.randn(3, 7, 24)
    F.mse_loss(module(x), target).backward()

    # The same loss by autograd through an explicit dequantization, straight through the rounding.
    codes = module.unpack()
    copy = offsets.detach().clone().requires_grad_()
    moved = codes.q.float() + CODE_GAIN * copy
    q = moved + (moved.detach().round().clamp(0, 2**bits - 1) - moved).detach()
    zeros = getattr(module, TRAINABLE_ZEROS).detach().round() if not sym else codes.zeros.float()
    scales = getattr(module, TRAINABLE_SCALES).detach().exp()
    weight = QuantizedWeight(q, scales, zeros, codes.g_idx, bits, group_size, sym).dequantize()
    F.mse_loss(F.linear(x, weight, module.bias), target).backward()
    torch.testing.assert_close(offsets.grad, copy.grad)
    assert offsets.grad.abs().sum() > 0


def test_trained_codes_move_one_step_at_most_and_freeze_into_the_packed_codes():
    torch.manual_seed(2)
    teacher = torch.nn.Linear(64, 16, bias=False)
    qw = quantize_rtn(teacher.weight.detach(), 3, 32, sym=True)
    module = QuantLinear.from_quantized(qw, None, LinearFormat(3, 32, True))
    # Correlated inputs: with isotropic ones rounding to nearest is already the best rounding.
    x = torch.randn(256, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(256, 64)
    with torch.no_grad():
        start = F.mse_loss(module(x), teacher(x)).item()
    optimizer = torch.optim.Adam(make_scales_trainable(module, codes=True, scales=False), lr=1e-3)
    assert [p.requires_grad for p in module.parameters()] == [False, True]  # scales frozen, offsets train
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 200)
    for _ in range(200):
        optimizer.zero_grad()
        F.mse_loss(module(x), teacher(x).detach()).backward()
        optimizer.step()
        schedule.step()
        project_codes(module)
        assert getattr(module, TRAINABLE_CODES).abs().max() <= 1 / CODE_GAIN
    with torch.no_grad():
        trained = module(x)
    assert F.mse_loss(trained, teacher(x)).item() < 0.5 * start  # rounding to nearest is not the best rounding

    scales = module.scales.clone()
    expected = moved_codes(qw.q, getattr(module, TRAINABLE_CODES), 3)
    assert freeze_scales(module) == 1
    assert not list(module.parameters())
    assert torch.equal(module.scales, scales)  # frozen scales rode along unchanged
    assert torch.equal(module.unpack().q, expected.int())  # the packed codes are what the training computed with
    step = expected - qw.q
    assert step.abs().max() == 1 and step.ne(0).any()
    with torch.no_grad():
        torch.testing.assert_close(module(x), trained)
