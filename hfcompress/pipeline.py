"""compress(): run a recipe's stages on a model, in order, and record what was done.

>>> import torch, hfcompress
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                                      num_attention_heads=4, vocab_size=100))
>>> model = hfcompress.compress(model, {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
>>> type(model.model.layers[0].mlp.up_proj).__name__
'QuantLinear'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from torch import nn

from .config import CompressionConfig
from .recipe import Recipe
from .quantization.stage import apply_quantize_stage

logger = logging.getLogger(__name__)

# Stage name -> runner(model, stage_config, compression_config). New stages register here.
STAGE_RUNNERS: dict[str, Callable] = {
    "quantize": apply_quantize_stage,
}


def base_model_id(model: nn.Module) -> str | None:
    """The Hub id the model came from, when it came from the Hub (not from a local path)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name or os.path.exists(name) or name.count("/") != 1 or name.startswith((".", "/")):
        return None
    return name


def _release_foreign_quantization(model: nn.Module) -> None:
    """Drop a GGUF loader's quantization config (its weights are already float); refuse others."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config.quant_method, "value", quantizer.quantization_config.quant_method)
    if method == "gguf":
        # transformers dequantized the GGUF tensors on load; the config only describes the source file.
        quantizer.remove_quantization_config(model)
    elif method == "hfcompress":
        if quantizer.quantization_config.modules and getattr(quantizer, "pre_quantized", False):
            raise ValueError("this model is already compressed by hfcompress; compress its original checkpoint instead")
    else:
        raise ValueError(
            f"this model is already quantized with {method!r}; hfcompress compresses float checkpoints: "
            "load the unquantized model"
        )


def attach_config(model: nn.Module, config: CompressionConfig) -> None:
    """Make ``save_pretrained`` write the compressed format and ``from_pretrained`` rebuild it."""
    from .integration.quantizer import CompressionQuantizer

    if not hasattr(model, "config"):
        return
    model.config.quantization_config = config
    if not isinstance(getattr(model, "hf_quantizer", None), CompressionQuantizer):
        model.hf_quantizer = CompressionQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module, "base_model_prefix"):
            module.config._is_quantized = True


def compress(
    model: nn.Module,
    recipe: Recipe | dict | str | os.PathLike,
    *,
    tokenizer=None,
    config: CompressionConfig | None = None,
) -> nn.Module:
    """Apply ``recipe`` to ``model`` in place and return it.

    ``recipe`` is a :class:`Recipe`, a dict, a YAML path or a bundled recipe name. ``tokenizer``
    is needed by data-driven stages. The result records its recipe and formats in
    ``model.config.quantization_config`` so that ``save_pretrained`` and ``from_pretrained``
    round-trip it.
    """
    recipe = Recipe.load(recipe)
    _release_foreign_quantization(model)
    config = config if config is not None else CompressionConfig()
    config.recipe = recipe
    if config.base_model is None:
        config.base_model = base_model_id(model)
    for i, stage in enumerate(recipe.stages, start=1):
        logger.info("stage %d/%d: %s", i, len(recipe.stages), stage.name)
        STAGE_RUNNERS[stage.name](model, stage, config)
    attach_config(model, config)
    return model
