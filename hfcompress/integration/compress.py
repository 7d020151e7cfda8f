"""compress(): the public entry point: a recipe's stages on a model, then the transformers side.

>>> import torch, hfcompress
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
...                                      num_attention_heads=4, vocab_size=100))
>>> model = hfcompress.compress(model, {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
>>> model.config.quantization_config.quant_method
'hfcompress'
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import CompressionConfig
from ..pipeline import apply_recipe
from ..recipe import Recipe
from .quantizer import attach_or_detach, release_foreign_quantization


def compress(
    model: nn.Module,
    recipe: Recipe | dict | str | os.PathLike,
    *,
    tokenizer=None,
    calibration_data: Any = None,
    resume_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    config: CompressionConfig | None = None,
) -> nn.Module:
    """Apply ``recipe`` to ``model`` in place and return it.

    ``recipe`` is a :class:`Recipe`, a dict, a YAML path or a bundled recipe name. Data-driven
    stages (GPTQ) calibrate on ``calibration_data`` (a text file or folder, a dataset, or token
    windows ``[n, seq_len]``), else on the recipe's ``calibration.data``, else on the bundled
    text; they need ``tokenizer`` for text (loaded from the model's folder when omitted).
    ``resume_dir`` keeps a checkpoint after every block, and a rerun with the same arguments
    continues from it. ``device`` is where blocks are computed (default: where the model is).
    The result records its recipe and formats in ``model.config.quantization_config`` so that
    ``save_pretrained`` and ``from_pretrained`` round-trip it; a model that needs nothing of
    hfcompress to reload (uniformly pruned, nothing packed) gets no such entry and saves as a plain
    checkpoint. Either way :func:`hfcompress.compression_record` returns what was done, and the record
    passed as ``config`` (filled in place) is that same object.
    """
    recipe = Recipe.load(recipe)  # a bad recipe is refused before the model is touched
    release_foreign_quantization(model)
    config = apply_recipe(model, recipe, tokenizer=tokenizer, calibration_data=calibration_data,
                          resume_dir=resume_dir, device=device, config=config)
    attach_or_detach(model, config)
    return model
