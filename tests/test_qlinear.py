"""QuantLinear against the dequantize-then-matmul reference, for every format."""

import pytest
import torch
import torch.nn.functional as F

from hfcompress.quantization import dispatch
from hfcompress.quantization.grid import QuantizedWeight
from hfcompress.quantization.qlinear import LinearFormat, QuantLinear
from hfcompress.quantization.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_forward_matches_reference_and_unpack_round_trips(bits, group_size, sym):
    torch.manual_seed(0)
    linear = torch.nn.Linear(100, 40, bias=True)  # 100 = 2*48 + 4: a ragged last group
    qw = quantize_rtn(linear.weight.detach(), bits, group_size, sym)
    module = QuantLinear.from_quantized(qw, linear.bias, LinearFormat(bits, group_size, sym))
    unpacked = module.unpack()
    assert torch.equal(unpacked.q, qw.q) and torch.equal(unpacked.zeros, qw.zeros)
    assert torch.equal(unpacked.scales, qw.scales)
    x = torch.randn(5, 100)
    expected = F.linear(x, qw.dequantize(), linear.bias)
    assert torch.equal(module.reference_forward(x), expected)
    assert torch.equal(module(x), expected)  # float32 takes the reference path: the CPU kernels are for bf16
    # bfloat16 takes torch's packed CPU kernel where one fits (4 bits with whole groups; 8 bits with
    # one group per row, and 100 columns are not a multiple of 8): same maths, other summation order.
    kernel = module.prepare_kernel(torch.device("cpu"))
    if dispatch.current_mode() == "auto":
        assert (kernel.name if kernel else None) == {(4, -1): "cpu-int4", (4, 32): "cpu-int4"}.get((bits, group_size))
    xb = x.bfloat16()
    torch.testing.assert_close(module(xb), module.reference_forward(xb), rtol=2e-2, atol=2e-2)


def test_act_order_group_index_is_stored_and_used():
    torch.manual_seed(0)
    qw = quantize_rtn(torch.randn(16, 64), 4, 32, sym=False)
    perm = torch.randperm(64)
    # A permuted grouping: column perm[i] belongs to group i // 32.
    g_idx = torch.empty(64, dtype=torch.int32)
    g_idx[perm] = torch.arange(64, dtype=torch.int32) // 32
    permuted = QuantizedWeight(qw.q, qw.scales, qw.zeros, g_idx, 4, 32, False)
    fmt = LinearFormat(4, 32, False, act_order=True)
    module = QuantLinear.from_quantized(permuted, None, fmt)
    assert torch.equal(module.g_idx, g_idx)
    assert torch.equal(module.dequantize_weight(), permuted.dequantize())
    with pytest.raises(ValueError, match="act_order"):
        QuantLinear.from_quantized(permuted, None, LinearFormat(4, 32, False))


def test_bf16_activations_give_bf16_outputs():
    qw = quantize_rtn(torch.randn(8, 64), 4, 64, sym=True)
    module = QuantLinear.from_quantized(qw, None, LinearFormat(4, 64, True))
    y = module(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 5, "group_size": 32, "sym": True}, "bits: expected 2, 3, 4 or 8, got 5"),
    ({"bits": 4, "group_size": 0, "sym": True}, r"group_size: expected -1 \(one group per row\) or a positive size, got 0"),
    ({"bits": 4, "group_size": 32, "sym": True, "scale_dtype": "int8"}, "scale_dtype: expected float16, bfloat16 or float32"),
])
def test_invalid_formats_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinearFormat(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 32), (8, -1)])
def test_gradients_reach_the_input_and_no_float_weight_is_kept_for_them(dtype, bits, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64)
    qw = quantize_rtn(linear.weight.detach(), bits, group_size, sym=False)
    module = QuantLinear.from_quantized(qw, linear.bias, LinearFormat(bits, group_size, False)).to(dtype)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = module(x)  # bf16 4/8 bits: torch's CPU kernels, which have no derivative of their own
    assert 64 * 128 not in saved  # the backward dequantizes the weight again instead
    y.float().square().sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, qw.dequantize().to(dtype), linear.bias.detach().to(dtype)).float().square().sum().backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(x.grad, x2.grad, **tolerance)
    assert not any(t.requires_grad for t in module.buffers())  # the packed weight stays frozen


def test_gradients_through_a_compiled_model_match_eager():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    packed = QuantLinear.from_quantized(quantize_rtn(linear.weight.detach(), 4, 32, True), linear.bias,
                                        LinearFormat(4, 32, True))
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), packed, torch.nn.ReLU()).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    model(x).float().sum().backward()
    eager = model[0].weight.grad.clone()
    model.zero_grad()
    torch.compile(model, backend="aot_eager")(x).float().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, eager, rtol=2e-2, atol=2e-2)
