"""Where a model's stack of decoder blocks is, found from its module tree.

A transformers model keeps its layers in one ``nn.ModuleList`` under its language model (for a
multimodal model, ``get_decoder()``: the text decoder, not the vision tower). Of the module lists
there, the stack is the one holding the most parameters: expert lists and per-head norm lists
live inside blocks, so they always hold fewer. That rule finds the blocks of every causal-LM
type transformers registers; :data:`BLOCK_PATHS` names the stack explicitly for a model type
where it would not (none needed today).

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                      num_attention_heads=4, vocab_size=50))
>>> blocks_path(model), len(decoder_blocks(model))
('model.layers', 2)
>>> language_model_path(model)
'model'
"""

from __future__ import annotations

import logging

from torch import nn

from ..errors import UserError

logger = logging.getLogger(__name__)

# model_type -> dotted path of the block stack from the model's root, where detection would pick
# the wrong list. Empty: detection finds every registered causal-LM type's stack.
BLOCK_PATHS: dict[str, str] = {}


class ArchitectureError(UserError, ValueError):
    """A model whose structure a stage cannot work with (no decoder stack, encoder-decoder, ...)."""


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _unique_params(module: nn.Module) -> int:
    """Elements of the weights (parameters, and buffers: packed weights once quantized)."""
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def language_model_path(model: nn.Module) -> str:
    """Dotted name of the text decoder: the language model of a multimodal model, else the base
    model (``""`` when that is the model itself)."""
    decoder = None
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            decoder = get()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
    if not isinstance(decoder, nn.Module) or not any(isinstance(m, nn.ModuleList) for m in decoder.modules()):
        decoder = getattr(model, "base_model", model)  # (ModernBERT's get_decoder() is its LM head)
    for name, module in model.named_modules():
        if module is decoder:
            return name
    return ""


# Path words of the modules that encode other modalities for the language model: their stacks are
# never the text decoder's, however many parameters they hold (tiny test models, big vision towers).
TOWER_WORDS = ("vision", "visual", "image", "audio", "speech", "video", "vit", "siglip", "clip", "perceiver")


def _in_tower(path: str) -> bool:
    return any(word in part for part in path.lower().split(".") for word in TOWER_WORDS)


def _check_decoder_only(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ArchitectureError(
            f"{type(model).__name__} is an encoder-decoder model; calibrated methods walk one stack of decoder "
            "blocks: load its decoder alone (e.g. the ...ForCausalLM class) or use method: rtn"
        )


def blocks_path(model: nn.Module) -> str:
    """Dotted name of the model's stack of blocks (the largest ``nn.ModuleList`` of its language model)."""
    explicit = BLOCK_PATHS.get(model_type(model))
    if explicit is not None:
        return explicit
    _check_decoder_only(model)
    root = language_model_path(model)
    base = model.get_submodule(root) if root else model
    best, best_params = None, 0
    stacks = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    text = [(name, m) for name, m in stacks if not _in_tower(name)]
    for name, module in text or stacks:
        params = _unique_params(module)
        if params > best_params:
            best, best_params = name, params
    if best is None:
        raise ArchitectureError(
            f"{type(model).__name__} ({model_type(model)}) has no stack of blocks (no nn.ModuleList of layers) under "
            "its language model; calibrated methods need one: use method: rtn"
        )
    return f"{root}.{best}" if root else best


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks, for layer-by-layer calibration."""
    return model.get_submodule(blocks_path(model))


def block_names(model: nn.Module) -> list[str]:
    """Full dotted names of the blocks, in order."""
    path = blocks_path(model)
    return [f"{path}.{i}" for i in range(len(model.get_submodule(path)))]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalization after the last block (``norm``, ``ln_f``, ``final_layernorm`` ...): the
    last direct child of the stack's parent that is neither the stack nor an embedding and holds a
    1-D weight of the hidden size."""
    path = blocks_path(model)
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    stack = model.get_submodule(path)
    found = None
    for child in parent.children():
        weight = getattr(child, "weight", None)
        if child is stack or isinstance(child, nn.Embedding) or not isinstance(weight, nn.Parameter):
            continue
        if weight.dim() == 1:
            found = child
    return found
