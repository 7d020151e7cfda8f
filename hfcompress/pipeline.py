"""apply_recipe(): run a recipe's stages on a model, in order, and record what was done.

The public :func:`hfcompress.compress` (``integration/compress.py``) calls it and then attaches
the transformers quantizer; this module knows nothing of transformers' plumbing.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                                      num_attention_heads=4, vocab_size=100))
>>> config = apply_recipe(model, {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
>>> type(model.model.layers[0].mlp.up_proj).__name__, len(config.modules)
('QuantLinear', 14)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import CompressionConfig
from .context import CompressionContext
from .errors import StageError
from .output import output_lock
from .precision import all_finite
from .models import ArchitectureError, decoder_blocks, matches
from .pruning.layout import PruningError, layout_of
from .pruning.select import remove_count
from .pruning.stage import apply_prune_stage, rebuild_pruned_structure
from .quantization.stage import apply_quantize_stage, rebuild_quantized_modules
from .recipe import CalibrationConfig, Recipe
from .rotation.stage import apply_rotate_stage
from .sharing.layers import SharingError, check_groups, groups_of, rebuild_shared_structure, register_shared_tensors
from .sharing.stage import apply_share_stage

logger = logging.getLogger(__name__)

def apply_distill_stage(model: nn.Module, stage, config: CompressionConfig, context: CompressionContext) -> None:
    from .distillation.stage import apply_distill_stage as run  # transformers.Trainer: imported when used

    run(model, stage, config, context)


# Stage name -> runner(model, stage_config, compression_config, context). New stages register here.
STAGE_RUNNERS: dict[str, Callable] = {
    "rotate": apply_rotate_stage,
    "prune": apply_prune_stage,
    "distill": apply_distill_stage,
    "share": apply_share_stage,
    "quantize": apply_quantize_stage,
}

# Reloading a compressed checkpoint redoes the structure of each stage that changed one, in the
# order the stages run (distill changes no structure), on the meta device before the weights load.
STAGE_REBUILDERS: dict[str, Callable[[nn.Module, CompressionConfig], None]] = {
    "prune": rebuild_pruned_structure,
    "share": lambda model, config: rebuild_shared_structure(model, config.shared),
    "quantize": rebuild_quantized_modules,
}


def rebuild(model: nn.Module, config: CompressionConfig) -> None:
    """Give a freshly built (empty) model the structure ``config`` records, stage by stage."""
    for rebuild_stage in STAGE_REBUILDERS.values():
        rebuild_stage(model, config)


def base_model_id(model: nn.Module) -> str | None:
    """The Hub id the model came from, when it came from the Hub (not from a local path)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name or os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


def _check_against_model(recipe: Recipe, model: nn.Module) -> None:
    """What the recipe asks that this model cannot give, refused before any stage runs (a late
    stage would otherwise fail after the calibration of the earlier ones): counts of layers, heads,
    FFN and hidden channels to prune, layer groups to share; ignore patterns that match nothing
    are said at once. Sizes are known until the first prune stage changes them; layer counts
    through every stage."""
    try:
        count = len(decoder_blocks(model))
    except ArchitectureError:
        return  # the stages themselves say what they cannot find
    sizes_known = True
    for i, stage in enumerate(recipe.stages):
        where = f"recipe stages[{i}].{stage.name}"
        if stage.name == "prune":
            if stage.layers >= count:
                raise PruningError(f"{where}.layers: {stage.layers} of the model's {count} decoder layers; keep at "
                                   f"least one (at most {count - 1} can be removed)")
            if sizes_known and (stage.heads or stage.ffn or stage.hidden or stage.overrides):
                _check_prune_amounts(model, stage, where, count)
            count -= stage.layers
            sizes_known = False
        elif stage.name == "share" and (stage.layers is not None or stage.every):
            try:
                check_groups(stage.layers if stage.layers is not None else groups_of(stage.every, count), count)
            except SharingError as err:
                raise SharingError(f"{where}: {err}") from None
        elif stage.name == "quantize" and stage.ignore:
            names = [name for name, _ in model.named_modules()]
            unused = [p for p in stage.ignore if not any(matches(name, [p]) for name in names)]
            if unused:
                logger.warning("%s.ignore: %s match%s no module of %s (check the spelling)", where,
                               ", ".join(map(repr, unused)), "es" if len(unused) == 1 else "", type(model).__name__)


def _check_prune_amounts(model: nn.Module, stage, where: str, count: int) -> None:
    """The amounts of the first prune stage (and its overrides) against the model's sizes: none may
    remove everything, and overrides name layers the model has."""
    beyond = sorted({i for o in stage.overrides for i in o.layers if i >= count})
    if beyond:
        raise PruningError(f"{where}.overrides: layers {beyond} do not exist; the model has {count} decoder layers "
                           f"(0 to {count - 1})")
    amounts = {stage.amounts(i) for i in range(count)}
    try:
        layout = layout_of(model, mlp=any(f for _, f in amounts) or bool(stage.hidden))
    except PruningError:
        return  # the stage says why this model cannot be pruned so
    sizes = layout.sizes(decoder_blocks(model)[0])
    try:
        for heads, ffn in amounts:
            if heads:
                unit = sizes.heads // sizes.kv_heads if stage.gqa == "groups" else sizes.kv_heads
                remove_count(heads, sizes.heads, unit, "heads", log=False)
            if ffn:
                remove_count(ffn, sizes.ffn, 1, "FFN channels", log=False)
        if stage.hidden:
            remove_count(stage.hidden, model.get_input_embeddings().weight.shape[1], 1, "hidden channels", log=False)
    except PruningError as err:
        raise PruningError(f"{where}.{err}") from None


@torch.no_grad()
def _non_finite(model: nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or infinite values."""
    seen, bad = set(), []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not tensor.is_meta and id(tensor) not in seen:
            seen.add(id(tensor))
            if not all_finite(tensor):
                bad.append(name)
    return bad


def _check_finite(model: nn.Module, what: str, before: list[str]) -> None:
    """Refuse a model that a stage left with NaN or infinite weights (buffers that held such values
    before, e.g. -inf masks, are the model's own): nothing of it gets saved."""
    new = [name for name in _non_finite(model) if name not in before]
    if new:
        raise StageError(f"{what} left non-finite values (NaN or inf) in {new[0]}"
                         f"{f' and {len(new) - 1} more tensors' if len(new) > 1 else ''}; nothing was saved. Check "
                         "the stage's numbers (learning rate, temperature, loss weights)")


def _vocab_size(model: nn.Module) -> int | None:
    """Rows of the input embedding table; None where the model has none to ask (a plain nn.Module,
    or a transformers model whose get_input_embeddings raises NotImplementedError): its token
    windows are then not checked against a vocabulary, and the forward pass is the judge."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def apply_recipe(
    model: nn.Module,
    recipe: Recipe | dict | str | os.PathLike,
    *,
    tokenizer=None,
    calibration_data: Any = None,
    resume_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    config: CompressionConfig | None = None,
) -> CompressionConfig:
    """Run ``recipe``'s stages on ``model`` in place; return the record of what was done.

    The transformers side (the quantizer that makes ``save_pretrained``/``from_pretrained``
    round-trip the result) is attached by :func:`hfcompress.compress`, which users call.
    """
    recipe = Recipe.load(recipe)
    previous = getattr(getattr(model, "config", None), "quantization_config", None)
    config = config if config is not None else CompressionConfig()
    if isinstance(previous, CompressionConfig):  # a compressed checkpoint compressed further keeps its record
        config.pruned = config.pruned or previous.pruned
        config.shared = config.shared or previous.shared
    config.recipe = recipe
    if config.base_model is None:
        config.base_model = base_model_id(model)
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if config.license is None and source and Path(source).is_dir():  # cheap: a local card (no Hub call)
        from .io import ModelSource, read_license

        config.license = read_license(ModelSource(os.fspath(source)), online=False)
    context = CompressionContext(
        calibration=recipe.calibration or CalibrationConfig(),
        calibration_data=calibration_data,
        tokenizer=tokenizer,
        tokenizer_source=(source, {}) if source else None,
        resume_dir=Path(resume_dir) if resume_dir is not None else None,
        device=torch.device(device) if device is not None else None,
        vocab_size=_vocab_size(model),
    )
    if any(getattr(stage, "teacher", None) == "original" for stage in recipe.stages):
        logger.info("keeping a copy of the model as it is now, the teacher of the distill stage")
        context.original_model = copy.deepcopy(model).eval()
    _check_against_model(recipe, model)
    non_finite = _non_finite(model)
    # Two runs resuming from one folder would overwrite each other's blocks: one at a time.
    with output_lock(resume_dir) if resume_dir is not None else contextlib.nullcontext():
        for i, stage in enumerate(recipe.stages, start=1):
            logger.info("stage %d/%d: %s", i, len(recipe.stages), stage.name)
            context.stage_index = i - 1
            STAGE_RUNNERS[stage.name](model, stage, config, context)
            _check_finite(model, f"stage {i} ({stage.name})", non_finite)
    context.original_model = None
    register_shared_tensors(model)  # each shared tensor is saved once
    return config
