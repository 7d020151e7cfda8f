"""Trainable group scales (zero points, codes): quantization-aware training that stays packed.

A packed layer multiplies by ``W = s[g] * (q - z[g])``: integer codes ``q`` (frozen unless
``codes``), one scale ``s`` and one zero point ``z`` per group ``g`` and output channel. Training ``s`` (and ``z`` when
asymmetric) against a teacher heals what rounding lost while the codes, the file format and the
bits per weight stay as they are (learned step sizes, as LSQ and ModelOpt's QAD train them).

Gradients, for a group ``g`` of columns ``k`` and an output channel ``n``, from the weight's
``dW = dL/dy^T x`` (``QuantLinear``'s ``_ScaledMatmul`` computes them):

    dL/ds[g, n] =  sum_{k in g} dW[n, k] * (q[n, k] - z[g, n])
    dL/dz[g, n] = -sum_{k in g} dW[n, k] * s[g, n]

With ``codes`` each code may move one grid step either way, through an offset ``o`` per weight
that the forward pass rounds (``q' = round(q + 20 o)``, clamped to one step; ``qlinear.CODE_GAIN``)
with the gradient passed straight through the rounding, as AutoRound trains rounding, end to end
here rather than block by block:

    dL/do[n, k] = 20 * dW[n, k] * s[g, n]

The offsets start at zero, half a step from moving any code: Adam's first steps are about the
learning rate for every parameter whatever its gradient, so offsets started spread within the
half step (as AutoRound's start at each weight's own distance from its rounding boundary) move
the codes near the edge on one batch's noise. Measured on SmolLM2 at 3 bits: that start took the
forward KL from 0.18 to 3.0 within 8 steps. From zero a code moves only after its gradient has
kept one sign long enough (``qlinear.CODE_GAIN`` says how long).

The scales train as their logarithm: an optimizer step is then a relative change of each scale,
whatever its size (scales span orders of magnitude across layers), and a scale never crosses
zero. Zero points (and moved codes) are integers in the format: they train as floats and the
forward pass rounds them (with a straight-through gradient), so what trains is exactly what
:func:`freeze_scales` stores. The stored buffers stay as they were until then.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .pack import pack_columns, pack_rows, unpack_columns
from .qlinear import CODE_GAIN, TRAINABLE_CODES, TRAINABLE_SCALES, TRAINABLE_ZEROS, QuantLinear, is_packed_linear, \
    moved_codes


def make_scales_trainable(model: nn.Module, zero_points: bool = True, codes: bool = False,
                          scales: bool = True) -> list[nn.Parameter]:
    """Give every packed layer of ``model`` trainable scales (and, for asymmetric layers when
    ``zero_points``, trainable zero points; with ``codes``, an offset per code), starting from the
    stored ones. Returns the new parameters that train (``scales=False``: the codes alone; the
    scales and zero points are parameters then too, frozen); :func:`freeze_scales` stores what
    they trained to. Packed embedding tables and packed tensors stay as they are: lookups and their
    owners' code read them, not the layer's forward pass that trains."""
    params = []
    for module in model.modules():
        if not is_packed_linear(module) or TRAINABLE_SCALES in module._parameters:
            continue
        new = {TRAINABLE_SCALES: nn.Parameter(module.scales.detach().float().log(), requires_grad=scales)}
        if zero_points and not module.format.sym:
            zeros = unpack_columns(module.qzeros, module.format.bits, module.out_features).float()
            new[TRAINABLE_ZEROS] = nn.Parameter(zeros, requires_grad=scales)
        if codes:
            new[TRAINABLE_CODES] = nn.Parameter(torch.zeros(module.out_features, module.in_features,
                                                            device=module.qweight.device))
        for name, param in new.items():
            module.register_parameter(name, param)
            if param.requires_grad:
                params.append(param)
        module._kernel = None
    return params


@torch.no_grad()
def project_codes(model: nn.Module) -> None:
    """Keep every code offset within one grid step (call after each optimizer step): past it the
    forward pass clamps the move, and an offset that drifted on would need as many steps back
    before its code could move again."""
    for module in model.modules():
        offsets = module._parameters.get(TRAINABLE_CODES) if isinstance(module, QuantLinear) else None
        if offsets is not None:
            offsets.clamp_(-1 / CODE_GAIN, 1 / CODE_GAIN)


@torch.no_grad()
def freeze_scales(model: nn.Module) -> int:
    """Store trained scales (zero points, codes) in the packed format and drop the trainable
    parameters; returns the number of layers frozen.

    Scales round to the format's scale dtype (never to zero); zero points and moved codes round
    onto the grid, as the forward pass already used them."""
    frozen = 0
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        log_scales = module._parameters.pop(TRAINABLE_SCALES, None)
        zeros = module._parameters.pop(TRAINABLE_ZEROS, None)
        offsets = module._parameters.pop(TRAINABLE_CODES, None)
        if log_scales is None and zeros is None and offsets is None:
            continue
        fmt = module.format
        if offsets is not None:
            codes = moved_codes(module.unpack().q, offsets, fmt.bits).to(torch.int32)
            module.qweight.copy_(pack_rows(codes.t(), fmt.bits))
        if log_scales is not None:
            info = torch.finfo(fmt.torch_scale_dtype)
            module.scales.copy_(log_scales.exp().clamp(info.tiny, info.max))
        if zeros is not None:
            module.qzeros.copy_(pack_columns(zeros.round().clamp(0, 2**fmt.bits - 1).to(torch.int32), fmt.bits))
        module._kernel = None  # repack the kernel with the new scales on the next forward
        frozen += 1
    return frozen


def layers_in_training(model: nn.Module) -> list[str]:
    """The packed layers of ``model`` whose scales are in training."""
    return [name for name, module in model.named_modules()
            if isinstance(module, QuantLinear) and TRAINABLE_SCALES in module._parameters]


def check_frozen(model: nn.Module) -> None:
    """Refuse to save scales in training: the stored buffers do not hold what was trained yet."""
    training = layers_in_training(model)
    if training:
        raise UserError(f"{len(training)} packed layers (first: {training[0]}) have scales in training; call "
                        "hfcompress.quantization.trainable.freeze_scales(model) before saving")
