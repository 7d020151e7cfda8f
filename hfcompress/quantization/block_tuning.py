"""Block-wise tuning of GPTQ's group scales: each block's output fitted with its codes frozen.

GPTQ fits every linear layer on its own: it minimises ``||W X - Q X||`` one layer at a time,
blind to what the block does with the layer's output afterwards (attention's softmax, the
gated MLP's product, the residual sum). After a block's layers are solved, ``tune`` epochs of
Adam move each group's scale ``s`` (as ``log s``: a step is a relative change, whatever the
scale's size, and a scale never crosses zero) to minimise the mean squared error of the whole
block's output over the calibration windows, the codes ``q`` and zero points ``z`` frozen:

    min_s  sum_windows || block(X_q; W = s[g] * (q - z[g])) - Y ||^2

``X_q`` is the quantized model's stream (the inputs the block will see) and the target ``Y``
the float block's output on those inputs; with asymmetric calibration (``asymmetric: a``) the
target moves the same fraction ``a`` of the way to the float model's own output, as each
layer's GPTQ target does. Only the scales change, so the stored format, its bits per weight and
the kernels stay as they are; the learning-rate schedule is cosine over all steps. This is the
scale half of block-wise reconstruction (OmniQuant's learnable clipping, EfficientQAT's
Block-AP train weights as well); the codes stay GPTQ's.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.func import functional_call

from ..calibration import BlockInputs, block_output, compute_context
from .grid import QuantizedWeight, round_scale

logger = logging.getLogger(__name__)


# Codes move in grid steps (scales in relative, log units): Adam's steps of 0.05 let a code that
# the gradient pushes steadily cross half a step within a few dozen steps, while noise alone
# (a random walk of sqrt(steps) * 0.05) rarely does over two epochs of 32 windows.
CODE_LR = 0.05


def _dequantize(weight: QuantizedWeight, log_scales: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``s[g] * (q - z[g])`` with ``s = exp(log_scales)`` ``[n_groups, N]``, differentiable in the scales.

    With ``offsets`` ``[N, K]`` the codes are ``round(q + offsets)`` on the grid, the rounding's
    gradient passed straight through (to the offsets)."""
    g = weight.g_idx.long()
    scales = log_scales.exp().t()[:, g]  # [N, K]
    zeros = weight.zeros.t()[:, g].float()
    q = weight.q.float()
    if offsets is not None:
        moved = q + offsets
        q = moved + (_codes(weight, offsets) - moved).detach()
    return (q - zeros) * scales


def _codes(weight: QuantizedWeight, offsets: torch.Tensor) -> torch.Tensor:
    """The codes the offsets round to, on the grid (float; the caller casts to ``weight.q``'s dtype)."""
    return (weight.q.float() + offsets).round().clamp(0, 2**weight.bits - 1)


def tune_block_scales(block: nn.Module, names: dict[str, nn.Module], weights: dict[str, QuantizedWeight],
                      inputs: BlockInputs, targets: torch.Tensor, device: torch.device, epochs: int,
                      lr: float, dtype: torch.dtype | None = None, extra: list[nn.Parameter] = (),
                      codes: bool = False, seed: int = 0) -> tuple[dict[str, QuantizedWeight], float, float]:
    """Tune the scales of ``weights`` (modules ``names`` of ``block``, by their names in it) so the
    block's outputs on ``inputs`` approach ``targets`` ``[windows, seq, hidden]``; ``extra``
    parameters of the block (its norms' weights) train with them, in place. With ``codes`` each
    code may also move one grid step either way (an offset per weight, rounded in the forward pass
    with a straight-through gradient, as AutoRound trains its rounding).

    Returns the weights with the tuned scales (rounded to their storage dtype, as stored), and
    the relative squared error of the block's output before and after (the mean over windows of
    ``||out - Y||^2 / ||Y||^2``, measured on the fly: "before" is the first epoch's).
    """
    log_scales = {name: nn.Parameter(w.scales.float().log()) for name, w in weights.items()}
    offsets = {name: nn.Parameter(torch.zeros(w.q.shape, device=w.q.device)) for name, w in weights.items()} if codes else {}
    groups = [{"params": [*log_scales.values(), *extra]}]
    if offsets:
        groups.append({"params": list(offsets.values()), "lr": CODE_LR})
    optimizer = torch.optim.Adam(groups, lr=lr)
    steps = epochs * len(inputs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)  # only the scales train: no gradient buffers for the block's own weights
    for p in extra:
        p.requires_grad_(True)
    order = torch.Generator().manual_seed(seed)
    first = last = 0.0
    try:
        with torch.enable_grad():
            for epoch in range(epochs):
                total = 0.0
                for i in torch.randperm(len(inputs), generator=order).tolist():
                    args, kwargs = inputs.call(i, device, torch.float32 if dtype == torch.float32 else None)
                    substitutes = {f"{name}.weight": _dequantize(weights[name], log_scales[name], offsets.get(name)).to(
                        names[name].weight.dtype) for name in weights}
                    with compute_context(device, dtype):
                        out = block_output(functional_call(block, substitutes, args, kwargs))
                    y = targets[i : i + 1].detach().to(device, out.dtype)
                    loss = (out - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    with torch.no_grad():
                        for offset in offsets.values():
                            offset.clamp_(-1, 1)  # one grid step either way at most
                    total += loss.item()
                if epoch == 0:
                    first = total / len(inputs)
                last = total / len(inputs)
    finally:
        for p in extra:
            p.requires_grad_(False)
            p.grad = None
        for p in frozen:
            p.requires_grad_(True)
    tuned = {}
    for name, w in weights.items():
        scales = round_scale(log_scales[name].detach().exp(), w.scales.dtype).to(w.scales.dtype)
        q = _codes(w, offsets[name].detach()).to(w.q.dtype) if offsets else w.q
        tuned[name] = QuantizedWeight(q, scales, w.zeros, w.g_idx, w.bits, w.group_size, w.sym)
    return tuned, first, last
