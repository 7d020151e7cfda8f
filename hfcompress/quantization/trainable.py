"""Trainable group scales (and zero points): quantization-aware training that stays packed.

A packed layer multiplies by ``W = s[g] * (q - z[g])``: integer codes ``q`` (frozen), one scale
``s`` and one zero point ``z`` per group ``g`` and output channel. Training ``s`` (and ``z`` when
asymmetric) against a teacher heals what rounding lost while the codes, the file format and the
bits per weight stay as they are (learned step sizes, as LSQ and ModelOpt's QAD train them).

Gradients, for a group ``g`` of columns ``k`` and an output channel ``n``, from the weight's
``dW = dL/dy^T x`` (``QuantLinear``'s ``_ScaledMatmul`` computes them):

    dL/ds[g, n] =  sum_{k in g} dW[n, k] * (q[n, k] - z[g, n])
    dL/dz[g, n] = -sum_{k in g} dW[n, k] * s[g, n]

The scales train as their logarithm: an optimizer step is then a relative change of each scale,
whatever its size (scales span orders of magnitude across layers), and a scale never crosses
zero. Zero points are integers in the format: they train as floats and the forward pass rounds
them (with a straight-through gradient), so what trains is exactly what :func:`freeze_scales`
stores. The stored buffers stay as they were until then.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .pack import pack_columns, unpack_columns
from .qlinear import TRAINABLE_SCALES, TRAINABLE_ZEROS, QuantLinear, is_packed_linear


def make_scales_trainable(model: nn.Module, zero_points: bool = True) -> list[nn.Parameter]:
    """Give every packed layer of ``model`` trainable scales (and, for asymmetric layers when
    ``zero_points``, trainable zero points), starting from the stored ones. Returns the new
    parameters; :func:`freeze_scales` stores what they trained to. Packed embedding tables and
    packed tensors stay as they are: lookups and their owners' code read them, not the layer's
    forward pass that trains."""
    params = []
    for module in model.modules():
        if not is_packed_linear(module) or TRAINABLE_SCALES in module._parameters:
            continue
        log_scales = nn.Parameter(module.scales.detach().float().log())
        module.register_parameter(TRAINABLE_SCALES, log_scales)
        params.append(log_scales)
        if zero_points and not module.format.sym:
            zeros = unpack_columns(module.qzeros, module.format.bits, module.out_features).float()
            module.register_parameter(TRAINABLE_ZEROS, nn.Parameter(zeros))
            params.append(module._parameters[TRAINABLE_ZEROS])
        module._kernel = None
    return params


@torch.no_grad()
def freeze_scales(model: nn.Module) -> int:
    """Store trained scales (and zero points) in the packed format and drop the trainable
    parameters; returns the number of layers frozen.

    Scales round to the format's scale dtype (never to zero); zero points round onto the grid,
    as the forward pass already used them."""
    frozen = 0
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        log_scales = module._parameters.pop(TRAINABLE_SCALES, None)
        zeros = module._parameters.pop(TRAINABLE_ZEROS, None)
        if log_scales is None and zeros is None:
            continue
        fmt = module.format
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
