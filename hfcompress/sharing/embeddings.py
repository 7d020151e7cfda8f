"""Tie ``lm_head`` to the input embeddings, the way transformers ties them.

After the tie both modules hold one ``nn.Parameter``, every config says ``tie_word_embeddings:
true`` and the model's tied-weights map is recomputed, so ``save_pretrained`` stores the matrix
once (under the input embeddings' name) and a plain ``from_pretrained`` ties it again: no plugin
is needed for this part.

The shared matrix stays in float through the ``quantize`` stage (``lm_head`` is not quantized
unless the recipe asks with ``lm_head: true``, which unties it deliberately), so the input and
the output use always read the same values.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..models import model_configs
from ..recipe import ShareStage
from .layers import SharingError

logger = logging.getLogger(__name__)


@torch.no_grad()
def tie_embeddings(model: nn.Module, mode: str = "input") -> None:
    """Make ``lm_head`` and the input embeddings one matrix: the input one (``input``), the output
    one (``output``) or their mean (``mean``)."""
    if mode not in ShareStage.TIES:
        raise SharingError(f"tie_embeddings: {mode!r} is not valid; valid: {', '.join(ShareStage.TIES)}")
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    embed = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if embed is None or head is None:
        raise SharingError(f"tie_embeddings: {type(model).__name__} has no output embeddings (lm_head) to tie; "
                           "load the model with its LM head (AutoModelForCausalLM or AutoModelForMaskedLM)")
    if not isinstance(getattr(head, "weight", None), nn.Parameter):
        raise SharingError("tie_embeddings: lm_head is already quantized; put share before quantize")
    if tuple(head.weight.shape) != tuple(embed.weight.shape):
        raise SharingError(f"tie_embeddings: lm_head {tuple(head.weight.shape)} and the input embeddings "
                           f"{tuple(embed.weight.shape)} differ in shape and cannot be one matrix")
    if hasattr(model, "get_expanded_tied_weights_keys") and not getattr(model, "_tied_weights_keys", None):
        raise SharingError(f"tie_embeddings: {type(model).__name__} declares no tied weights "
                           "(_tied_weights_keys), so transformers could not save and reload the tie")
    if head.weight is embed.weight:
        logger.info("tie_embeddings: lm_head and the input embeddings are already tied")
    else:
        if mode == "output":
            embed.weight.copy_(head.weight)
        elif mode == "mean":
            embed.weight.copy_(((embed.weight.float() + head.weight.float()) / 2).to(embed.weight.dtype))
        head.weight = embed.weight
        logger.info("tie_embeddings: lm_head now uses the input embeddings' matrix (%s)", mode)
    for config in model_configs(model):
        config.tie_word_embeddings = True
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def untie_output_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own weight when it was tied to the input embeddings (quantizing or
    rotating a tied ``lm_head`` would otherwise also change the input embeddings)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return
    logger.info("lm_head is tied to the input embeddings: untying it so that lm_head changes alone")
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for cfg in model_configs(model):
        cfg.tie_word_embeddings = False
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = {}
