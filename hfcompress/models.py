"""Where the compressible layers of a transformers model are, across families.

Linear layers come in two shapes: ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D``
(weight ``[in, out]``). Everything else in hfcompress sees them through :func:`linear_weight`
and :func:`linear_shape`, as ``[out, in]``.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> list(find_linear_layers(net))
['0', '2']
>>> list(find_linear_layers(net, ignore=["2"]))
['0']
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; ``Conv1D`` is transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches a glob pattern, as a full name or as a dotted suffix.

    ``"lm_head"`` matches ``lm_head``; ``"mlp.down_proj"`` matches every layer's
    ``model.layers.N.mlp.down_proj``; ``"model.layers.0.*"`` matches what is under layer 0.
    """
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def model_configs(model: nn.Module) -> list:
    """The model's config and, for multimodal models, its text config (each once): where sizes live."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return list({id(c): c for c in (config, text)}.values())


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the logits (``lm_head``), if the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_linear_layers(
    model: nn.Module, ignore: Iterable[str] = (), include_lm_head: bool = False
) -> dict[str, nn.Module]:
    """Linear layers to compress, in module order; ``lm_head`` only when asked.

    Embeddings are never returned (they are not linear layers). Patterns in ``ignore`` that match
    nothing are reported in the log, since they are usually typos.
    """
    ignore = list(ignore)
    heads = set() if include_lm_head else output_embedding_names(model)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) and name not in heads and not matches(name, ignore):
            found[name] = module
    all_names = [name for name, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]
    for pattern in ignore:
        if not any(matches(name, [pattern]) for name in all_names):
            logger.warning("ignore pattern %r matches no linear layer of %s", pattern, type(model).__name__)
    return found


# Where each family keeps its stack of blocks, relative to ``model.base_model``.
BLOCK_PATHS = {
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "gpt2": "h",
    "opt": "decoder.layers",
    "bert": "encoder.layer",
}


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks, for layer-by-layer calibration.

    Raises a ValueError naming the model type and the supported ones when the family is unknown.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in BLOCK_PATHS:
        raise ValueError(
            f"calibrated methods do not support model type {model_type!r} yet; supported: "
            f"{', '.join(sorted(BLOCK_PATHS))} (data-free method rtn works on any model)"
        )
    base = getattr(model, "base_model", model)
    return base.get_submodule(BLOCK_PATHS[model_type])
