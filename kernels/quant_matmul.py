"""Triton kernels for ``y = x @ dequant(W)^T`` with ``W`` packed in the GPTQ layout (4 or 8 bits).

Contract (every kernel here; ``K = in_features``, ``N = out_features``, ``G = ceil(K / group)``):

========== =================================== =====================================================
argument   dtype / shape / layout              meaning
========== =================================== =====================================================
x          fp16 or bf16 ``[M, K]``, any        activations (act-order: already permuted, see below)
           strides
qweight    int32 ``[ceil(K*bits/32), N]``      codes packed along K: row ``k // (32/bits)`` holds
                                               ``k`` at bit ``(k % (32/bits)) * bits``
scales     fp16/bf16/fp32 ``[G, N]``           one scale per group and output channel
qzeros     int32 ``[G, ceil(N*bits/32)]``      zero points packed along N, stored as is
out        ``x.dtype`` ``[M, N]`` (fp32 when   ``sum_k x[m, k] * scale[g, n] * (q[k, n] - z[g, n])``
           split-K accumulates atomically)     with ``g = k // group``, fp32 accumulation
========== =================================== =====================================================

Groups are contiguous runs of ``group`` columns of K; the last one may be short (SmolLM2: 576 =
4 x 128 + 64). ``group = K`` for one group per row. A K tile never straddles two groups
(``BLOCK_K`` divides ``group``), so each tile loads one row of scales and zeros, not one per
element. Act-order checkpoints are repacked once at load time (``hfcompress.quantization.dispatch``)
so that their groups become contiguous: the kernel then reads ``x[:, perm]``, a gather on the small
activation matrix per call instead of a gather per weight element inside the K loop.

Two launch shapes:
- decode (small M): ``BLOCK_M = 16`` and split-K, so that one token keeps every SM busy; the
  partial sums of the K splits are added atomically into an fp32 buffer;
- prefill (large M): a tiled GEMM, one program per output tile, dequantization fused in the K loop.

Each weight is dequantized exactly as the reference path does (``(q - z) * scale`` in fp32,
rounded to the activation dtype), so the kernels differ from it only by the order of the sums.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU (slowly).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_BITS = (4, 8)


@triton.jit
def _dequant_tile(qweight_ptr, scales_ptr, qzeros_ptr, offs_k, offs_n, k_mask, n_mask, g,
                  stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                  BITS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of ``dequant(W)^T`` for columns ``offs_k`` (all in group ``g``)."""
    PER_WORD: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    words = tl.load(qweight_ptr + (offs_k // PER_WORD)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
    q = (words >> ((offs_k % PER_WORD) * BITS)[:, None]) & MASK
    scale = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    zword = tl.load(qzeros_ptr + g * stride_zg + (offs_n // PER_WORD) * stride_zn, mask=n_mask, other=0)
    z = (zword >> ((offs_n % PER_WORD) * BITS)) & MASK
    return ((q - z[None, :]).to(tl.float32) * scale[None, :]).to(OUT_DTYPE)


@triton.jit
def quant_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_om, stride_on,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Tiled ``x @ dequant(W)^T``; program ``(m, n, s)`` owns an output tile and every SPLIT_K-th K tile.

    ``DOT_FP32`` multiplies in fp32: only for Triton's interpreter, whose bf16 ``tl.dot`` is wrong.
    """
    tl.static_assert(BITS == 4 or BITS == 8, "4 or 8 bits")
    tl.static_assert(BLOCK_K % (32 // BITS) == 0, "a K tile covers whole packed words")
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16, "tl.dot needs tiles of at least 16")
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _dequant_tile(qweight_ptr, scales_ptr, qzeros_ptr, offs_k, offs_n, k_mask, n_mask,
                          (kb * BLOCK_K) // group_size, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg,
                          stride_zn, BITS, x_ptr.dtype.element_ty)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


@triton.jit
def quant_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr,
    N, K, group_size,
    stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One token (M = 1): a split-K GEMV without tensor cores; partial sums added into fp32 ``out [N]``."""
    tl.static_assert(BITS == 4 or BITS == 8, "4 or 8 bits")
    tl.static_assert(BLOCK_K % (32 // BITS) == 0, "a K tile covers whole packed words")
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_k * stride_xk, mask=k_mask, other=0.0)
        w = _dequant_tile(qweight_ptr, scales_ptr, qzeros_ptr, offs_k, offs_n, k_mask, n_mask,
                          (kb * BLOCK_K) // group_size, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg,
                          stride_zn, BITS, x_ptr.dtype.element_ty)
        acc += tl.sum(x.to(tl.float32)[:, None] * w.to(tl.float32), axis=0)
    tl.atomic_add(out_ptr + offs_n, acc, mask=n_mask)


def _block_k(group_size: int, preferred: int) -> int:
    """The largest power of two <= ``preferred`` (>= 16) that divides the group (so no tile straddles two)."""
    block = preferred
    while block > 16 and group_size % block:
        block //= 2
    if group_size % block:
        raise ValueError(f"group size {group_size} is not a multiple of 16: use the reference path")
    return block


def _m_bucket(M: int) -> int:
    return 1 if M == 1 else 16 if M <= 16 else 64 if M <= 64 else 256


# Launch configurations by M bucket: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages).
# The GPU autotuner picks among these per (bucket, N, K); the interpreter takes the first.
CONFIGS = {
    1: [(1, 128, 128, 8, 4, 3), (1, 64, 256, 8, 4, 3), (1, 256, 64, 4, 4, 3), (1, 128, 64, 16, 4, 3),
        (1, 64, 128, 16, 2, 3), (1, 32, 256, 4, 2, 4)],
    16: [(16, 64, 128, 4, 4, 3), (16, 128, 64, 4, 4, 3), (16, 64, 64, 8, 4, 3), (16, 128, 128, 2, 4, 3),
         (16, 256, 64, 2, 8, 3), (16, 32, 128, 8, 2, 4)],
    64: [(64, 64, 64, 1, 4, 3), (64, 128, 64, 1, 4, 3), (32, 128, 64, 2, 4, 3), (64, 64, 128, 2, 4, 3)],
    256: [(128, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 4), (64, 128, 64, 1, 4, 4), (128, 256, 64, 1, 8, 3),
          (256, 128, 64, 1, 8, 3), (64, 64, 64, 1, 4, 3)],
}
if INTERPRET:  # small tiles keep the interpreter quick and still exercise masking and split-K
    CONFIGS = {1: [(1, 32, 32, 2, 1, 1)], 16: [(16, 32, 32, 2, 1, 1)], 64: [(16, 32, 32, 1, 1, 1)],
               256: [(32, 32, 32, 1, 1, 1)]}

_best: dict[tuple, tuple] = {}  # (bucket, N, K, group, bits, dtype) -> config, filled by autotune()


def _launch(x, qweight, scales, qzeros, bits, group_size, config):
    M, K = x.shape
    N = scales.shape[1]
    block_m, block_n, block_k, split_k, warps, stages = config
    block_k = _block_k(group_size, block_k)
    common = dict(BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
    launch = {} if INTERPRET else dict(num_warps=warps, num_stages=stages)
    strides = (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), qzeros.stride(0),
               qzeros.stride(1))
    if block_m == 1:
        out = torch.zeros(N, device=x.device, dtype=torch.float32)
        grid = (triton.cdiv(N, block_n), split_k)
        quant_gemv_kernel[grid](x, qweight, scales, qzeros, out, N, K, group_size, x.stride(1), *strides,
                                **common, **launch)
        return out.to(x.dtype).unsqueeze(0)
    if split_k == 1:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    else:
        out = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    quant_matmul_kernel[grid](x, qweight, scales, qzeros, out, M, N, K, group_size, x.stride(0), x.stride(1),
                              *strides, out.stride(0), out.stride(1), BLOCK_M=block_m,
                              DOT_FP32=INTERPRET and x.dtype == torch.bfloat16, **common, **launch)
    return out.to(x.dtype)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 bits: int, group_size: int) -> torch.Tensor:
    """``x [M, K] @ dequant(W)^T -> [M, N]`` in ``x.dtype`` (see the module's contract).

    ``group_size`` is the stored group (``K`` for one group per row) and must be a multiple of 16.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"the Triton kernels take bits in {SUPPORTED_BITS}, not {bits}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernels take float16 or bfloat16 activations, not {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    bucket = _m_bucket(x.shape[0])
    key = (bucket, scales.shape[1], x.shape[1], group_size, bits, x.dtype)
    config = _best.get(key)
    if config is None:
        tunable = x.is_cuda and not INTERPRET and not torch.cuda.is_current_stream_capturing()
        config = autotune(x, qweight, scales, qzeros, bits, group_size) if tunable else CONFIGS[bucket][0]
    return _launch(x, qweight, scales, qzeros, bits, group_size, config)


def autotune(x, qweight, scales, qzeros, bits, group_size, rep: int = 50) -> tuple:
    """Time every configuration of the M bucket on these shapes (GPU), remember and return the best.

    Done once per (M bucket, N, K, group, bits, dtype), outside the hot path: the first call of a
    shape pays for it, later calls (and CUDA graph captures) only launch.
    """
    bucket = _m_bucket(x.shape[0])
    key = (bucket, scales.shape[1], x.shape[1], group_size, bits, x.dtype)
    if key not in _best:
        timings = {}
        for config in CONFIGS[bucket]:
            try:
                timings[config] = triton.testing.do_bench(
                    lambda c=config: _launch(x, qweight, scales, qzeros, bits, group_size, c), rep=rep)
            except (triton.runtime.errors.OutOfResources, ValueError):
                continue
        _best[key] = min(timings, key=timings.get)
    return _best[key]
