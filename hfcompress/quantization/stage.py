"""The ``quantize`` stage: swap linear layers for packed QuantLinears, and rebuild them on load.

The maths lives in ``rtn.py`` (and later ``gptq.py``); this file only walks the model, shows
progress and records what it did in the :class:`~hfcompress.config.CompressionConfig`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CompressionConfig
from ..models import find_linear_layers, linear_shape, linear_weight, model_configs, output_embedding_names
from ..recipe import QuantizeStage
from ..sharing.layers import tie_shared_modules
from .qlinear import LinearFormat, QuantLinear
from .rtn import quantize_rtn

logger = logging.getLogger(__name__)


def untie_output_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own weight when it was tied to the input embeddings.

    Quantizing a tied ``lm_head`` would otherwise also change the input embeddings.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return
    logger.info("lm_head is tied to the input embeddings: untying it so that only lm_head is quantized")
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for cfg in model_configs(model):
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}


def _quantize_rtn(model: nn.Module, stage: QuantizeStage, layers: dict[str, nn.Module], config: CompressionConfig,
                  fmt: LinearFormat) -> None:
    for name, module in tqdm(layers.items(), desc=f"RTN {stage.bits}-bit", unit="layer"):
        quantized = quantize_rtn(linear_weight(module).detach(), stage.bits, stage.group_size, stage.sym,
                                 fmt.torch_scale_dtype)
        model.set_submodule(name, QuantLinear.from_quantized(quantized, module.bias, fmt))
        config.modules[name] = fmt


@torch.no_grad()
def apply_quantize_stage(model: nn.Module, stage: QuantizeStage, config: CompressionConfig, context) -> None:
    """Quantize the model's linear layers in place, as the stage says."""
    if stage.lm_head and output_embedding_names(model):
        untie_output_embeddings(model)
    layers = find_linear_layers(model, stage.ignore, include_lm_head=stage.lm_head)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no linear layers left to quantize (after ignore={stage.ignore}); "
            "check the ignore patterns"
        )
    logger.info("quantizing %d linear layers: %s, %d bits, group size %d, %s",
                len(layers), stage.method, stage.bits, stage.group_size, "symmetric" if stage.sym else "asymmetric")
    rtn_format = LinearFormat(bits=stage.bits, group_size=stage.group_size, sym=stage.sym)
    if stage.method == "rtn":
        _quantize_rtn(model, stage, layers, config, rtn_format)
        tie_shared_modules(model, config.shared)
        return
    from ..models import decoder_blocks
    from .gptq_runner import quantize_gptq

    decoder_blocks(model)  # an unsupported family fails here, before calibration data loads
    windows = context.calibration_windows()
    resume = context.resume_state(model, stage, windows)
    dtype = getattr(torch, context.calibration.dtype) if context.calibration.dtype else None
    outside = quantize_gptq(model, stage, layers, windows, config.modules.__setitem__, resume, context.device, dtype)
    if outside:
        logger.info("%s: outside the transformer blocks, quantized by rounding (RTN)", ", ".join(outside))
        _quantize_rtn(model, stage, {name: layers[name] for name in outside}, config, rtn_format)
    tie_shared_modules(model, config.shared)


def rebuild_quantized_modules(model: nn.Module, config: CompressionConfig) -> None:
    """Replace the layers named in ``config`` by empty QuantLinears (on the meta device), before loading."""
    for name, fmt in config.modules.items():
        try:
            module = model.get_submodule(name)
            in_features, out_features = linear_shape(module)
        except (AttributeError, TypeError):
            raise ValueError(
                f"the checkpoint's quantization_config names {name!r}, which is not a linear layer of "
                f"{type(model).__name__}: the config.json does not belong to this model class"
            ) from None
        weight = linear_weight(module)
        if name in output_embedding_names(model):
            untie_output_embeddings(model)
        qlinear = QuantLinear(in_features, out_features, fmt, bias=module.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        model.set_submodule(name, qlinear)
