"""Activation-aware weight scaling (AWQ: Lin, Tang, Tang, Yang, Dang, Gan, Han, 2023).

A few input channels of a linear layer see much larger activations than the rest; rounding
errors in the weights of those channels cost the most output error. AWQ scales those weights
up before rounding (a finer grid for them, relative to their size) and the activations down by
the same factor, folded into the operation before (a norm's scale, or the rows of the linear
that produced the input), so the float function is unchanged:

    y = x W^T = (x / s) (W diag(s))^T,    s = mean|x|^alpha  (per input channel)

``alpha`` in [0, 1] is searched on a grid per group of linears that read the same input, for
the smallest output error after rounding ``W diag(s)``; ``alpha = 0`` (no scaling) is on the
grid, so the search never does worse than plain rounding on the calibration sample. Here the
error is measured on the linears' own outputs (the paper measures the enclosing module's:
costlier, and for the groups here the same thing up to the attention's nonlinearity).

>>> torch.manual_seed(0) and None
>>> x = torch.randn(256, 32) * torch.linspace(0.1, 8, 32)  # channels of very different sizes
>>> W = torch.randn(16, 32)
>>> from hfcompress.quantization.rtn import quantize_rtn
>>> rtn = lambda w: quantize_rtn(w, 3, 16, True).dequantize()
>>> s = search_scales(x, W, rtn)
>>> error = lambda Wq: float((x @ Wq.T - x @ W.T).pow(2).mean())
>>> error(rtn(W * s) / s) < error(rtn(W))
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def scales_for(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mean|x|^alpha``, normalized to a geometric middle of one (the reference code's choice)."""
    s = x_mean.clamp_min(1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scales(x: torch.Tensor, W: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor],
                  grid: int = 20) -> torch.Tensor:
    """The per-input-channel scales ``s`` ``[K]`` that minimize ``|x W^T - x (R(W s) / s)^T|^2``.

    ``x`` ``[T, K]``: a sample of the inputs; ``W`` ``[N, K]``: the weights of every linear that
    reads them, stacked; ``rounding``: the quantizer, returning the dequantized weights.
    """
    x, W = x.float(), W.float()
    reference = x @ W.T
    x_mean = x.abs().mean(0)
    best_error, best = float("inf"), torch.ones_like(x_mean)
    for i in range(grid + 1):
        s = scales_for(x_mean, i / grid)
        error = float((x @ (rounding(W * s) / s).T - reference).pow(2).mean())
        if error < best_error:
            best_error, best = error, s
    return best
