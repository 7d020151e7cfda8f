"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022): quantize a layer column by column, moving
each column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian.

Notation, as in the paper and its reference code:

- ``W`` ``[N, K]``: the layer's weight (rows = outputs, columns = inputs);
- ``H = 2 X X^T`` ``[K, K]``: the Hessian of the layer's squared error ``||W X - Q X||^2`` with
  respect to a row of ``W``, from calibration inputs ``X`` ``[K, tokens]`` (accumulated by
  :func:`accumulate_hessian` as a running mean);
- ``Hinv``: the upper Cholesky factor of ``H^-1``; its row ``i`` holds the update that column
  ``i``'s error ``Err1 = (w - q) / Hinv[i, i]`` makes to the columns after it;
- ``i1:i2``: a block of ``block_size`` columns; updates inside the block are immediate, the
  rest of ``W`` gets them lazily once per block (the paper's "lazy batch updates").

Shrinkage (``shrink``, our addition): ``H <- (1 - shrink) H + shrink diag(H)``, which pulls the
input correlations (off-diagonal) toward zero and keeps each input's own energy (diagonal). The
error compensation of GPTQ trusts every correlation of the calibration sample; many of them are
specific to that text (or just sampling noise, with a few thousand tokens for thousands of
dimensions), and compensation along them does not carry over to other text. Shrinking the sample
covariance toward its diagonal is the textbook remedy for an overfit covariance estimate
(Ledoit and Wolf, 2004; Schafer and Strimmer, 2005); ``shrink = 1`` reduces GPTQ to rounding with
the grids it chose, ``shrink = 0`` is the paper's method.

Options: dampening ``damp`` (a fraction of the mean diagonal, raised automatically when the
Cholesky factorization fails), dead inputs (``H[i, i] = 0``: the column is zeroed), groups
(a scale per ``group_size`` columns, the last group may be short), act-order (columns in order
of decreasing ``H[i, i]``), static groups (group grids fixed from the original ``W`` in natural
order, so act-order needs no ``g_idx`` at inference), and an MSE search of the clipping range,
with each column's error weighted by its input energy ``H[j, j]`` (3-bit g64 on SmolLM2, first 8
WikiText-2 windows: 64.5 without the search, 45.3 with the plain search, 39.8 weighted).

>>> import torch
>>> torch.manual_seed(0) and None
>>> W, X = torch.randn(8, 64), torch.randn(64, 512)
>>> H = accumulate_hessian(torch.zeros(64, 64), X.t(), 0)[0]
>>> result = gptq_quantize(W, H, bits=4, group_size=32, sym=True)
>>> from hfcompress.quantization.rtn import quantize_rtn
>>> rtn = quantize_rtn(W, 4, 32, True).dequantize()
>>> bool(((result.weight.dequantize() - W) @ X).norm() < ((rtn - W) @ X).norm())
True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .grid import QuantizedWeight, find_scale_zero, quantize, round_scale, scale_zero_of_range

logger = logging.getLogger(__name__)


def accumulate_hessian(H: torch.Tensor, x: torch.Tensor, count: int,
                       compute_dtype: torch.dtype | None = None,
                       reference: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Fold inputs ``x`` ``[..., K]`` into the running mean ``H = 2/n * sum x x^T``; returns (H, n).

    With ``reference`` (``[..., K]``, the same tokens) the running mean is ``2/n * sum reference
    x^T`` instead: the cross product of asymmetric calibration (see :func:`asymmetric_target`)
    with the float model's inputs, or its part ``D`` with their difference from ``x``.
    ``H`` stays float32; ``compute_dtype=torch.bfloat16`` computes each batch's ``x^T x`` in bf16
    (2x faster on CPUs with bf16 dot products), whose rounding averages out over batches.
    """
    x = x.reshape(-1, x.shape[-1])
    new = x.shape[0]
    left = x if reference is None else reference.reshape(-1, x.shape[-1])
    keep, weight = count / (count + new), 2 / (count + new)  # scaled after the product: no scaled copies of x
    if compute_dtype is None or compute_dtype == torch.float32:
        H.addmm_(left.float().t(), x.float(), beta=keep, alpha=weight)
    else:
        H.mul_(keep).add_((left.to(compute_dtype).t() @ x.to(compute_dtype)).float(), alpha=weight)
    return H, count + new


def input_statistics(x: torch.Tensor, compute_dtype: torch.dtype | None = None,
                     reference: torch.Tensor | list[torch.Tensor] | None = None,
                     rows: int = 2048) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """``(H, n, C)`` of a layer's inputs ``x`` ``[..., K]``: the Hessian ``2/n x^T x`` over all
    ``n`` rows and, with ``reference`` (the float model's inputs for the same tokens, whole or as
    consecutive pieces), the cross product ``C = 2/n reference^T x`` of asymmetric calibration
    (else ``None``).

    Summed ``rows`` at a time: a low-precision ``compute_dtype`` rounds each batch's product, and
    the rounding averages out over batches. ``C`` is summed as ``H + D`` with ``D`` from the
    difference ``reference - x`` (taken in float32), which a low-precision product then rounds
    relative to the difference's own size, not to H's.
    """
    x = x.reshape(-1, x.shape[-1])
    pieces = [None] * math.ceil(x.shape[0] / rows)
    if reference is not None:
        whole = [reference] if isinstance(reference, torch.Tensor) else reference
        pieces = [p for r in whole for p in r.reshape(-1, x.shape[-1]).split(rows)]
        if sum(p.shape[0] for p in pieces) != x.shape[0]:
            raise ValueError(f"reference holds {sum(p.shape[0] for p in pieces)} rows for {x.shape[0]} inputs")
    low = compute_dtype is not None and compute_dtype != torch.float32
    H = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
    D = None if reference is None else torch.zeros_like(H)
    parts = x.split(rows) if reference is None else x.split([p.shape[0] for p in pieces])
    for part, paired in zip(parts, pieces):
        part = part.float()
        delta = None if paired is None else paired.to(part.device, torch.float32) - part
        if low:  # each batch converted once, for both products
            part = part.to(compute_dtype)
            H += (part.t() @ part).float()
            if delta is not None:
                D += (delta.to(compute_dtype).t() @ part).float()
        else:
            H.addmm_(part.t(), part)
            if delta is not None:
                D.addmm_(delta.t(), part)
    n = x.shape[0]
    H.mul_(2 / n)
    return H, n, (None if D is None else D.mul_(2 / n).add_(H))


def find_scale_zero_mse(w: torch.Tensor, bits: int, sym: bool, grid: int = 100, max_shrink: float = 0.8,
                        norm: float = 2.4, column_weight: torch.Tensor | None = None,
                        budget: int = 1 << 26, step: int = 1, grow: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`find_scale_zero`, but shrink the range while the ``norm``-error drops.

    Tries ranges in steps of ``1 / grid`` of the full one, from ``grow`` times it down to
    ``1 - max_shrink`` of it (the GPTQ code's search has ``grow = 1``; a symmetric grid has one
    level more below zero than above, so only ``grow > 1`` lets its top level reach a largest
    weight that is positive); ``column_weight`` ``[k]`` weighs each column's error (GPTQ passes
    ``diag(H)``). Ties keep the wider range. Candidates are measured together, ``budget`` bytes of
    them at a time. With ``step`` > 1 every ``step``-th range is measured, then, for each row,
    the ``step - 1`` on either side of its best (a third of the work at 4; a row whose error
    curve has its minimum in a narrow dip between two measured ranges may settle for a near one).
    """
    w = w.float()
    maxq = 2**bits - 1
    # Candidate p's grid spans the shrunk weights w * p. Rounding is monotonic, so their range is
    # exactly (p * min, p * max): every candidate's grid comes from the row's ends, bit for bit the
    # grid that measuring w * p gives. (Scaling the full range's scale by p instead differs by an
    # ulp here and there, and the codes those ulps flip are amplified by later blocks' calibration:
    # benchmarks/README.md, "Issue 20's rows".)
    low, high = torch.aminmax(w, dim=1)
    wider = round((grow - 1) * grid)  # ranges above the full one
    factors = torch.tensor([1 - i / grid for i in range(-wider, int(max_shrink * grid))], device=w.device)
    best_scale, best_zero = scale_zero_of_range(low, high, bits, sym)
    best_err = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_index = torch.zeros(w.shape[0], dtype=torch.long, device=w.device)

    def measure(candidates: torch.Tensor) -> None:
        """Keep each row's best of ``candidates`` ``[c, N]`` (indices into ``factors``, widest first)."""
        nonlocal best_scale, best_zero, best_err, best_index
        for part in candidates.split(max(1, budget // (4 * w.numel()))):
            p = factors[part]
            scale, zero = scale_zero_of_range(low * p, high * p, bits, sym)  # [c, N]
            err = quantize(w, scale, zero, maxq).sub_(zero[..., None]).mul_(scale[..., None]).sub_(w).abs_().pow_(norm)
            err = (err if column_weight is None else err.mul_(column_weight)).sum(-1)
            least, pick = err.min(0)  # the first (widest) of equal errors, as a scan with < would keep
            better = least < best_err
            best_err = torch.where(better, least, best_err)
            best_scale = torch.where(better, scale.gather(0, pick[None])[0], best_scale)
            best_zero = torch.where(better, zero.gather(0, pick[None])[0], best_zero)
            best_index = torch.where(better, part.gather(0, pick[None])[0], best_index)

    rows = w.shape[0]
    everything = torch.arange(len(factors), device=w.device)
    measure(everything[::step, None].expand(-1, rows))
    if step > 1:  # the neighbours of each row's best, nearest the full range first
        around = (best_index[None] + torch.arange(1 - step, step, device=w.device)[:, None])
        measure(around.clamp(0, len(factors) - 1))
    return best_scale, best_zero


def asymmetric_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float,
                      ridge: float | None = None) -> torch.Tensor:
    """The weights that GPTQ should reproduce on quantized inputs: ``W* = W C H^-1``.

    GPTAQ's asymmetric calibration (Li et al., 2025): the quantized model feeds a layer inputs
    ``Xq`` that differ from the float model's ``X``; the layer's error against the float model is
    ``||W X - Q Xq||^2``. With ``H = Xq Xq^T`` and ``C = X Xq^T`` (``cross``, accumulated token by
    token beside ``H``), that error equals ``||W* Xq - Q Xq||^2`` plus a constant: the normal
    equations of least squares. So GPTQ on ``W*`` with ``H`` solves the asymmetric objective, and
    the error upstream layers left in the stream is compensated here as far as ``Q`` can. ``H`` is
    dampened as GPTQ dampens it (a ridge that keeps ``W*`` from chasing directions the sample
    barely spans).

    ``ridge`` (a fraction of ``H``'s mean diagonal, like ``damp``) regularizes the correction alone:
    ``W* = W + W (C - H) (H + ridge)^-1``, the ridge regression of the upstream error on ``Xq``,
    which shrinks toward ``W`` itself (no correction) rather than toward zero, so it can be large.
    """
    W, H, C = W.float(), H.float(), C.float()
    Hd = _dampen_(H.clone(), damp if ridge is None else ridge)
    if ridge is None:
        # W* = W C Hd^-1, i.e. Hd W*^T = C^T W^T (Hd is symmetric).
        return torch.linalg.solve(Hd, C.t() @ W.t()).t()
    # W* - W = W (C - H) Hd^-1, i.e. Hd (W* - W)^T = (C - H)^T W^T.
    return W + torch.linalg.solve(Hd, (C - H).t() @ W.t()).t()


def refit_scales(W: torch.Tensor, H: torch.Tensor, weight: QuantizedWeight, scale_dtype: torch.dtype) -> QuantizedWeight:
    """Least-squares scales for the codes GPTQ chose: each row's group scales minimize
    ``(W - Q) H (W - Q)^T`` with the codes and zero points fixed.

    GPTQ fixes a group's scale before choosing its codes (from the weights as they are when the
    group starts), and then moves weights around under it. Given the codes, the output error is a
    quadratic in a row's ``n_groups`` scales, solved exactly: with centered codes ``D = q - z``,
    ``M[g, h] = D_g^T H_gh D_h`` and ``b[g] = D_g^T (H W^T)_g``, the scales are ``M^-1 b``. A
    scale that would turn non-positive (a degenerate group) keeps its old value.
    """
    N, K = weight.q.shape
    n_groups = weight.scales.shape[0]
    H = H.float()
    g_idx = weight.g_idx.long()
    D = weight.q.float() - weight.zeros.float().t().gather(1, g_idx[None].expand(N, K))  # [N, K]
    onehot = torch.nn.functional.one_hot(g_idx, n_groups).float()  # [K, G]
    b = (D * (W.float() @ H)) @ onehot  # [N, G]
    M = torch.empty(N, n_groups, n_groups, device=W.device)
    for h in range(n_groups):
        cols = (g_idx == h).nonzero().flatten()
        M[:, :, h] = (D * (D[:, cols] @ H[cols])) @ onehot
    old = weight.scales.float().t()  # [N, G]
    ridge = 1e-6 * torch.diagonal(M, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
    M = M + ridge[:, None, None] * torch.eye(n_groups, device=W.device)
    new, info = torch.linalg.solve_ex(M, b)
    ok = (info == 0)[:, None] & (new > 0) & torch.isfinite(new)
    scales = round_scale(torch.where(ok, new, old).t().contiguous(), scale_dtype)
    return QuantizedWeight(weight.q, scales.to(weight.scales.dtype), weight.zeros, weight.g_idx, weight.bits,
                           weight.group_size, weight.sym)


def relative_error(W: torch.Tensor, Q: torch.Tensor | QuantizedWeight, H: torch.Tensor, rows: int = 1024) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)`` with ``dW = Q - W``: the output error relative to the output.

    ``Q`` is the dequantized weight or the :class:`QuantizedWeight` itself (dequantized here a
    chunk of rows at a time). Summed over chunks of ``rows`` rows, so that no ``[N, K]``
    temporary is made: for the stacked FFN pair of a 1B model each is 92 MB, and four of them
    set the peak memory of a whole layer-wise GPTQ run.
    """
    H = H.float()
    error = reference = 0.0
    for start in range(0, W.shape[0], rows):
        stop = min(start + rows, W.shape[0])
        w = W[start:stop].float()
        q = Q.rows(start, stop).dequantize() if isinstance(Q, QuantizedWeight) else Q[start:stop].float()
        d = q - w
        error += float(torch.sum((d @ H) * d))
        reference += float(torch.sum((w @ H) * w))
    return error / max(reference, 1e-30)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damp: float  # the dampening that was finally used
    error: float  # relative reconstruction error on the calibration sample (see relative_error)


def _dampen_(A: torch.Tensor, fraction: float) -> torch.Tensor:
    """``A + fraction * mean(diag A) * I``, in place (no identity matrix): GPTQ's damping and the
    asymmetric target's ridge."""
    A.diagonal().add_(fraction * torch.mean(torch.diag(A)))
    return A


def _cholesky_inverse_upper(prepare: Callable[[], torch.Tensor], damp: float,
                            max_damp: float = 10.0) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, raising ``damp`` until it exists.

    ``prepare`` returns a fresh copy of ``H`` that this function may overwrite: the factor, the
    inverse and the inverse's factor are each computed in that one buffer (K = 5632 is 127 MB per
    K x K matrix), and a failed attempt asks for a new copy instead of keeping one aside.
    """
    while True:
        A = _dampen_(prepare(), damp)
        info = torch.empty((), dtype=torch.int32, device=A.device)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0:
                return A, damp
        del A
        if damp >= max_damp:
            raise RuntimeError(f"the Hessian is not positive definite even with dampening {damp}")
        logger.warning("Cholesky factorization failed with dampening %g; retrying with %g", damp, damp * 10)
        damp *= 10


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    mse: bool = False,
    mse_step: int = 1,
    mse_grow: float = 1.0,
    shrink: float = 0.0,
    scale_dtype: torch.dtype = torch.float16,
    measure: bool = True,
) -> GPTQResult:
    """Quantize ``W`` ``[N, K]`` given the Hessian ``H`` ``[K, K]`` of its inputs; ``measure=False``
    leaves the result's ``error`` NaN (for callers that measure parts of ``W`` themselves)."""
    N, K = W.shape
    maxq = 2**bits - 1
    G = K if group_size == -1 else group_size
    n_groups = math.ceil(K / G)
    W_orig = W.float()
    H_sample = H.float()  # the reported error is measured on the calibration sample itself (not changed here)

    def find(w: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The clipping search weighs each column's error by its input energy H[j, j]: a column
        # that sees large inputs costs more output error per unit of weight error.
        if mse:
            return find_scale_zero_mse(w, bits, sym, column_weight=energy, step=mse_step, grow=mse_grow)
        return find_scale_zero(w, bits, sym)

    # Only H's diagonal is needed outside the factorization; the working K x K matrix is built
    # (and rebuilt, should dampening have to grow) from the sample by `working_hessian`.
    diagonal = torch.diag(H_sample).clone()  # shrinking leaves it as it is: (1 - s) d + s d
    dead = diagonal == 0
    diagonal[dead] = 1
    W = W_orig
    if dead.any():  # columns that never see an input: zeroed, in a copy
        W = W_orig.clone()
        W[:, dead] = 0

    scales = torch.zeros(n_groups, N, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, N, dtype=torch.float32, device=W.device)
    if static_groups:
        # Group grids from the original weights, in natural column order.
        for g in range(n_groups):
            scale, zeros[g] = find(W[:, g * G : (g + 1) * G], diagonal[g * G : (g + 1) * G])
            scales[g] = round_scale(scale, scale_dtype)

    perm = torch.argsort(diagonal, descending=True) if act_order else torch.arange(K, device=W.device)
    diagonal = diagonal[perm]

    def working_hessian() -> torch.Tensor:
        # In processing order, shrunk, dead inputs set to 1; one temporary beside the result.
        # One gather for both permutations (H[perm][:, perm] would make a second K x K temporary).
        H = H_sample[perm[:, None], perm] if act_order else H_sample.clone()
        if shrink:  # (1 - shrink) H + shrink diag(H), in place
            sample_diagonal = torch.diag(H)
            H.mul_(1 - shrink)
            H.diagonal().add_(shrink * sample_diagonal)
        H[dead[perm], dead[perm]] = 1
        return H

    Hinv, damp = _cholesky_inverse_upper(working_hessian, damp)

    # The loop works on W^T (and Q^T, Err1^T) so that each column of W is a contiguous row.
    Wt = W.t()[perm].contiguous()  # [K, N], in processing (permuted) order: the one working copy
    del W
    # Codes of at most 8 bits: a byte each (int32 would be as large as the float weights, and a
    # block's codes wait for packing while the next group of the block is solved).
    Qt = torch.zeros(K, N, dtype=torch.uint8, device=Wt.device)
    groups = [p // G for p in perm.tolist()] if static_groups else [c // G for c in range(K)]
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i  # position in processing order
            g = groups[col]
            if not static_groups and col % G == 0:
                # The group's current weights: the rest of this block, then columns not yet reached.
                current = torch.cat([W1[i:], Wt[i2:]])[: min(G, K - col)]
                scale, zeros[g] = find(current.t(), diagonal[col : col + current.shape[0]])
                scales[g] = round_scale(scale, scale_dtype)
            scale, zero = scales[g], zeros[g]
            w = W1[i]
            q = quantize(w[:, None], scale, zero, maxq)[:, 0]
            Qt[col] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # W1[:, i:] -= err Hinv1[i, i:]
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # the lazy batch update

    del Wt, Hinv
    g_idx = torch.tensor(groups, dtype=torch.int32, device=Qt.device)
    invperm = torch.argsort(perm)
    Q, g_idx = Qt.t()[:, invperm], g_idx[invperm]
    del Qt
    weight = QuantizedWeight(Q, scales.to(scale_dtype), zeros.to(torch.int32), g_idx, bits, group_size, sym)
    return GPTQResult(weight, damp, relative_error(W_orig, weight, H_sample) if measure else math.nan)
