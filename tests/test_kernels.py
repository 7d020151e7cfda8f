"""Kernels against the reference path (dequantize, then matmul).

The Triton grid runs in Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set in conftest.py
before any kernel is defined) and on the GPU when there is one; the CPU int4/int8 path runs
everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hfcompress.quantization import LinearFormat, QuantLinear, dispatch
from hfcompress.quantization.grid import QuantizedWeight, find_scale_zero, quantize, round_scale


def quantized_layer(N: int, K: int, bits: int, group_size: int, sym: bool, act_order: bool = False, seed: int = 0,
                    bias: bool = False) -> QuantLinear:
    """A QuantLinear with random codes and grids (act-order: GPTQ-style shuffled groups)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen)
    G = K if group_size == -1 else group_size
    perm = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // G).int()  # column perm[i] is the i-th quantized: group i // G
    n_groups = -(-K // G)
    scales = torch.zeros(n_groups, N)
    zeros = torch.zeros(n_groups, N)
    q = torch.zeros(N, K, dtype=torch.int32)
    for g in range(n_groups):
        cols = (g_idx == g).nonzero()[:, 0]
        scale, zero = find_scale_zero(W[:, cols], bits, sym)
        scale = round_scale(scale, torch.float16)
        scales[g], zeros[g] = scale, zero
        q[:, cols] = quantize(W[:, cols], scale, zero, 2**bits - 1).int()
    qw = QuantizedWeight(q, scales.half(), zeros.int(), g_idx, bits, group_size, sym)
    fmt = LinearFormat(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    b = torch.randn(N, generator=gen) if bias else None
    return QuantLinear.from_quantized(qw, b, fmt)


def reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """float32 sums of x and the weights rounded to x's dtype, exactly as the reference path rounds them."""
    W = layer.dequantize_weight().to(x.dtype).float()
    y = x.float() @ W.t()
    return y + layer.bias.float() if layer.bias is not None else y


def assert_close(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    # The kernels differ from the reference only by summation order and the final rounding.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, atol=tol * scale, rtol=tol)


# --- Triton, interpreted on CPU -------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install 'hfcompress[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (M, N, K, bits, group, sym, act_order, dtype): K = 200 with groups of 64 ends in an 8-column
# group; N = 37 is not a multiple of the tile nor of a packed word; M = 33 spans three row tiles.
GRID = [
    (1, 40, 200, 4, 64, True, False, torch.float16),
    (3, 37, 200, 4, 64, False, False, torch.bfloat16),
    (16, 40, 256, 4, 128, True, True, torch.float16),
    (33, 72, 176, 4, 32, False, True, torch.float16),
    (1, 72, 192, 4, 128, False, True, torch.bfloat16),
    (3, 40, 176, 4, -1, True, False, torch.float16),
    (16, 37, 160, 8, 32, False, False, torch.bfloat16),
    (33, 40, 200, 8, 64, True, True, torch.float16),
    (1, 40, 96, 8, -1, False, False, torch.float16),
    (3, 24, 128, 8, 128, True, False, torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("M,N,K,bits,group,sym,act_order,dtype", GRID)
def test_triton_kernel_matches_the_reference(M, N, K, bits, group, sym, act_order, dtype):
    layer = quantized_layer(N, K, bits, group, sym, act_order, seed=M + K, bias=M == 3).to(DEVICE)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(DEVICE, dtype)
    with dispatch.use("triton"):
        kernel = layer.prepare_kernel(torch.device(DEVICE))
        assert kernel is not None and kernel.name == "triton"
        assert (kernel.perm is not None) == (act_order and group != -1)
        y = layer(x)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y.cpu(), reference(layer, x).cpu(), dtype)


@needs_triton
def test_triton_op_traces_under_torch_compile():
    layer = quantized_layer(40, 128, 4, 64, True, act_order=True).to(DEVICE)
    x = torch.randn(2, 5, 128).to(DEVICE, torch.float16)
    with dispatch.use("triton"):
        expected = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)


@needs_triton
def test_kernel_refuses_what_it_cannot_do():
    from hfcompress.kernels.quant_matmul import quant_matmul

    layer = quantized_layer(16, 64, 4, 32, True)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        quant_matmul(x, layer.qweight, layer.scales, layer.qzeros, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul(x.half(), layer.qweight, layer.scales, layer.qzeros, 3, 32)


def test_layouts_the_triton_kernels_cannot_read_stay_on_the_reference_path():
    with dispatch.use("triton"):
        assert quantized_layer(8, 100, 4, 50, True).prepare_kernel(torch.device("cpu")) is None  # 50 % 16
        assert quantized_layer(8, 64, 3, 32, True).prepare_kernel(torch.device("cpu")) is None  # 3 bits


# --- the CPU path ---------------------------------------------------------------------------

CPU_GRID = [
    (1, 40, 200, 4, 64, True, False),  # ragged last group: padded K; N padded to 48
    (3, 37, 576, 4, -1, False, False),  # one group per row = nine groups of 64
    (5, 40, 256, 4, 128, False, True),  # act-order
    (2, 24, 192, 4, 96, True, False),  # 96 = 3 x 32
    (4, 40, 128, 8, -1, True, False),
    (1, 40, 128, 8, -1, False, False),  # asymmetric: rank-one correction
]


@pytest.mark.parametrize("M,N,K,bits,group,sym,act_order", CPU_GRID)
def test_cpu_kernels_match_the_reference(M, N, K, bits, group, sym, act_order):
    layer = quantized_layer(N, K, bits, group, sym, act_order, seed=K, bias=True)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
    kernel = layer.prepare_kernel(torch.device("cpu"))
    assert kernel is not None and kernel.name == f"cpu-int{bits}"
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    # torch's kernels apply scales (and int4 offsets) rounded to bfloat16: bfloat16 tolerance.
    assert_close(y, reference(layer, x), torch.bfloat16)
    x32 = x.float()
    assert not kernel.accepts(x32)  # float32 activations take the reference path
    assert torch.equal(layer(x32), layer.reference_forward(x32))


def test_cpu_path_falls_back_and_can_be_switched_off():
    layer = quantized_layer(8, 64, 2, 32, True)
    assert layer.prepare_kernel(torch.device("cpu")) is None  # 2 bits: reference
    grouped8 = quantized_layer(8, 64, 8, 32, True)
    assert grouped8.prepare_kernel(torch.device("cpu")) is None  # int8 matmul has no groups
    layer4 = quantized_layer(8, 64, 4, 32, True)
    x = torch.randn(2, 64).bfloat16()
    with dispatch.use("reference"):
        assert torch.equal(layer4(x), layer4.reference_forward(x))
    assert layer4.prepare_kernel(torch.device("cpu")).name == "cpu-int4"


def test_new_weights_invalidate_the_repacked_copy():
    a, b = quantized_layer(8, 64, 4, 32, True, seed=1), quantized_layer(8, 64, 4, 32, True, seed=2)
    x = torch.randn(2, 64).bfloat16()
    a(x)  # repacks a's weights
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b(x))


# --- GPU only ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [1, 16, 256])
def test_cuda_graph_replays_the_kernels(M):
    layer = quantized_layer(512, 1024, 4, 128, True, act_order=True).cuda()
    x = torch.randn(M, 1024, device="cuda", dtype=torch.float16)
    layer(x)  # repacks and autotunes outside the capture
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_y, layer(new_x))
    assert_close(static_y, reference(layer, new_x), torch.float16)
