"""The ``quantize`` stage: swap linear layers for packed QuantLinears, and rebuild them on load.

The maths lives in ``rtn.py`` and ``gptq.py``; this file only chooses the targets, walks the
model, shows progress and records what it did in the :class:`~hfcompress.config.CompressionConfig`.

Targets are the linear layers of the language model (a multimodal model's vision and audio towers
and projectors stay in float unless ``include`` names them), the experts of MoE layers (unfused
first into one linear layer per expert, see :mod:`hfcompress.models.experts`), and not the
routers (``routers: true`` quantizes them too), and the raw weights that the model multiplies
itself rather than through a linear layer (packed in place and rounded, see
:mod:`hfcompress.quantization.packed_tensor`). What stays in float is counted and reported.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import CompressionConfig, SharedRecord
from ..context import CompressionContext
from ..errors import CheckpointError, UserError
from ..models import (ArchitectureError, block_names, decoder_blocks, find_fused_experts, find_linear_layers, is_linear,
                      language_model_path, linear_shape, linear_weight, matches, model_configs, output_embedding_names,
                      raw_weights, unfuse_experts)
from ..models.layout import ROUTER_NAMES
from ..recipe import QuantizeStage
from ..residency import by_unit, resident
from ..sharing.embeddings import untie_output_embeddings
from ..sharing.layers import merge_records, tie_shared_modules
from .coverage import FLOAT_SHARE_LIMIT, float_share
from .embedding import QuantEmbedding
from .packed_tensor import SUFFIX as PACKED_SUFFIX
from .packed_tensor import empty_packed_parameter, pack_parameter
from .qlinear import LinearFormat, QuantLinear
from .resume import resume_state
from .rtn import quantize_rtn

logger = logging.getLogger(__name__)


def _quantize_rtn(model: nn.Module, stage: QuantizeStage, layers: dict[str, nn.Module],
                  config: CompressionConfig) -> None:
    progress = tqdm(total=len(layers), desc=f"RTN {stage.bits}-bit", unit="layer")
    for unit, names in by_unit(model, layers):  # a model on disk: one block in memory at a time
        with resident(model, unit):
            for name in names:
                module = layers[name]
                fmt = stage.linear_format(name, rounded=True)
                quantized = quantize_rtn(linear_weight(module).detach(), fmt.bits, fmt.group_size, fmt.sym,
                                         fmt.torch_scale_dtype)
                model.set_submodule(name, QuantLinear.from_quantized(quantized, module.bias, fmt))
                config.modules[name] = fmt
                progress.update(1)
    progress.close()


class PartialQuantizationError(UserError, ValueError):
    """``strict: true`` and the stage would leave too much of the decoder in float."""


def _is_router(name: str, module: nn.Module) -> bool:
    """A layer that scores experts or gates a shared expert: tiny, and sensitive to rounding."""
    return name.rsplit(".", 1)[-1] in ROUTER_NAMES and linear_shape(module)[1] < 512


def select_targets(model: nn.Module, stage: QuantizeStage) -> dict[str, nn.Module]:
    """The float linear layers this stage quantizes, in module order (experts already unfused)."""
    root = language_model_path(model)
    within = [root] if root else None
    layers = find_linear_layers(model, stage.ignore, include_lm_head=stage.lm_head, within=within)
    if stage.include:
        for name, module in model.named_modules():
            if is_linear(module) and matches(name, stage.include) and not matches(name, stage.ignore):
                layers.setdefault(name, module)
        layers = {name: module for name, module in model.named_modules() if name in layers}  # module order
    if not stage.routers:
        layers = {name: module for name, module in layers.items() if not _is_router(name, module)}
    return layers


def select_raw_weights(model: nn.Module, stage: QuantizeStage) -> list[str]:
    """The weight tensors of the decoder blocks that no linear layer holds (see
    :func:`~hfcompress.models.raw_weights`), minus ignored ones and, unless ``routers``, routers'."""
    try:
        blocks = list(zip(block_names(model), decoder_blocks(model)))
    except ArchitectureError:
        return []
    names = [name for prefix, block in blocks for name in raw_weights(block, prefix=prefix)]
    names = [name for name in names if not matches(name, stage.ignore) and not matches(name.rpartition(".")[0], stage.ignore)]
    if not stage.routers:
        names = [name for name in names if not set(name.split(".")[-2:]) & set(ROUTER_NAMES)]
    return names


def _pack_raw_weights(model: nn.Module, names: list[str], config: CompressionConfig, stage: QuantizeStage,
                      method: str) -> None:
    """Round the raw weights to their formats and pack them in place (GPTQ cannot see their inputs)."""
    level = logging.WARNING if method != "rtn" else logging.INFO
    logger.log(level, "%d weight tensors that are not linear layers (the model multiplies them itself) are rounded to "
               "nearest (RTN): %s", len(names), ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else ""))
    for name in names:
        owner, _, pname = name.rpartition(".")
        fmt = stage.linear_format(name, rounded=True)
        pack_parameter(model.get_submodule(owner), pname, fmt)
        config.modules[name + PACKED_SUFFIX] = fmt


def _unfuse_experts(model: nn.Module, stage: QuantizeStage) -> None:
    """Experts stored as 3-D parameters become one linear layer per expert, unless ignored."""
    root = language_model_path(model)
    names = [name for name in find_fused_experts(model)
             if (not root or name.startswith(root + ".")) and not matches(name, stage.ignore)]
    if names:
        unfuse_experts(model, names)
        logger.info("unfused the experts of %d MoE layers into per-expert linear layers", len(names))


def check_float_share(model: nn.Module, stage: QuantizeStage, targets: dict[str, nn.Module],
                      raw: list[str] = ()) -> None:
    """Before any work: refuse (``strict``) or warn when the targets leave over 10% of the decoder in float."""
    try:
        share = float_share(model)
    except ArchitectureError:
        return  # no stack of blocks (an RTN-only model): nothing to measure against
    planned = {id(m) for m in targets.values()}
    raw = set(raw)
    left = {name: count for name, count in share.modules.items()
            if name not in raw and id(_owner(model, name)) not in planned}
    fraction = sum(left.values()) / share.total if share.total else 0.0
    if fraction <= FLOAT_SHARE_LIMIT:
        return
    names = ", ".join(list(left)[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
    message = (f"quantize would leave {fraction:.1%} of the decoder's weight elements in float ({names}); "
               "check ignore, routers and include")
    if stage.strict:
        raise PartialQuantizationError(message + " (strict: true)")
    logger.warning(message)


def _owner(model: nn.Module, parameter_name: str) -> nn.Module:
    return model.get_submodule(parameter_name.rpartition(".")[0])


def report_float_share(model: nn.Module) -> None:
    """Log what the stage left in float, by module type."""
    try:
        share = float_share(model)
    except ArchitectureError:
        return
    level = logging.WARNING if share.fraction > FLOAT_SHARE_LIMIT else logging.INFO
    logger.log(level, "quantize: decoder blocks keep %s", share.describe())


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def quantize_embeddings(model: nn.Module, stage: QuantizeStage, config: CompressionConfig) -> None:
    """The input embedding table as one packed :class:`QuantEmbedding` (RTN, data-free); a tied
    ``lm_head`` becomes the same module, recorded as shared so the table is stored once."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embed, nn.Embedding):
        raise ValueError(f"quantize embeddings: {type(model).__name__} has no nn.Embedding input table "
                         f"({type(embed).__name__}); remove the embeddings key")
    options = stage.embeddings
    fmt = LinearFormat(bits=options.bits, group_size=options.group_size, sym=options.sym)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and getattr(head, "weight", None) is embed.weight
    name = _module_name(model, embed)
    head_name = _module_name(model, head) if tied else None
    quantized = quantize_rtn(embed.weight.detach(), fmt.bits, fmt.group_size, fmt.sym, fmt.torch_scale_dtype)
    table = QuantEmbedding.from_quantized(quantized, fmt, embed)
    model.set_submodule(name, table)
    config.modules[name] = fmt
    if tied:
        model.set_submodule(head_name, table)  # one object: the lookup and the output projection
        config.shared = merge_records(config.shared, SharedRecord({head_name: name}))
        for cfg in model_configs(model):  # the sharing record ties them now, not transformers
            cfg.tie_word_embeddings = False
        if hasattr(model, "all_tied_weights_keys"):
            model.all_tied_weights_keys = {}
    logger.info("embedding table %s: %d-bit, group size %d%s", name, fmt.bits, fmt.group_size,
                f", also the output projection {head_name}" if tied else "")


@torch.no_grad()
def apply_quantize_stage(model: nn.Module, stage: QuantizeStage, config: CompressionConfig,
                         context: CompressionContext) -> None:
    """Quantize the model's linear layers (and experts) in place, as the stage says."""
    if stage.embeddings is not None:
        quantize_embeddings(model, stage, config)
    if stage.lm_head and output_embedding_names(model) and not isinstance(model.get_output_embeddings(), QuantEmbedding):
        untie_output_embeddings(model)
    if stage.method in ("gptq", "awq"):
        from ..models import decoder_blocks

        decoder_blocks(model)  # a model without a stack of blocks fails here, before calibration data loads
    if stage.method == "awq" or stage.awq:
        from .awq_runner import apply_awq_scales

        apply_awq_scales(model, stage, context.calibration_windows(), context.device, context.compute_dtype(model))
    _unfuse_experts(model, stage)
    layers = select_targets(model, stage)
    raw = select_raw_weights(model, stage)
    if not layers and not raw:
        raise ValueError(
            f"{type(model).__name__} has no linear layers left to quantize (after ignore={stage.ignore}); "
            "check the ignore patterns"
        )
    check_float_share(model, stage, layers, raw)
    logger.info("quantizing %d linear layers: %s, %d bits, group size %d, %s",
                len(layers), stage.method, stage.bits, stage.group_size, "symmetric" if stage.sym else "asymmetric")
    if raw:
        _pack_raw_weights(model, raw, config, stage, stage.method)
    if not layers:
        tie_shared_modules(model, config.shared)
        report_float_share(model)
        return
    if stage.method in ("rtn", "awq"):  # AWQ's scales are folded in by now: it rounds like RTN
        _quantize_rtn(model, stage, layers, config)
    else:
        from .gptq_runner import quantize_gptq

        windows = context.calibration_windows()
        resume = resume_state(model, stage, windows, context)
        dtype = context.compute_dtype(model)
        outside = quantize_gptq(model, stage, layers, windows, config.modules.__setitem__, resume, context.device,
                                dtype)
        if outside:
            logger.info("%s: outside the transformer blocks, quantized by rounding (RTN)", ", ".join(outside))
            _quantize_rtn(model, stage, {name: layers[name] for name in outside}, config)
    tie_shared_modules(model, config.shared)
    report_float_share(model)


def rebuild_quantized_modules(model: nn.Module, config: CompressionConfig) -> None:
    """Replace the layers named in ``config`` by empty QuantLinears (on the meta device), before loading;
    experts that were quantized are unfused first, as they were when they were quantized."""
    experts = [name for name in find_fused_experts(model) if any(m.startswith(name + ".") for m in config.modules)]
    unfuse_experts(model, experts)
    for name, fmt in config.modules.items():
        owner, _, pname = name.removesuffix(PACKED_SUFFIX).rpartition(".")
        if (name.endswith(PACKED_SUFFIX) and not _has_module(model, name) and _has_module(model, owner)
                and pname in model.get_submodule(owner)._parameters):
            empty_packed_parameter(model.get_submodule(owner), pname, fmt)  # a raw weight (see packed_tensor)
            continue
        module = model.get_submodule(name) if _has_module(model, name) else None
        if isinstance(module, nn.Embedding):
            model.set_submodule(name, QuantEmbedding.empty_like(module, fmt))
            continue
        try:
            module = model.get_submodule(name)
            in_features, out_features = linear_shape(module)
        except (AttributeError, TypeError):
            raise CheckpointError(
                f"the checkpoint's quantization_config names {name!r}, which is not a linear layer of "
                f"{type(model).__name__}: the config.json does not belong to this model class"
            ) from None
        weight = linear_weight(module)
        if name in output_embedding_names(model):
            untie_output_embeddings(model)
        qlinear = QuantLinear(in_features, out_features, fmt, bias=module.bias is not None,
                              device=weight.device, dtype=weight.dtype)
        model.set_submodule(name, qlinear)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
