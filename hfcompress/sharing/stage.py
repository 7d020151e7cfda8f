"""The ``share`` stage: tie the embeddings and/or make groups of decoder layers share weights."""

from __future__ import annotations

from torch import nn

from ..config import CompressionConfig
from ..context import CompressionContext
from ..models import decoder_blocks
from ..recipe import ShareStage
from .embeddings import tie_embeddings
from .layers import SharingError, groups_of, merge_records, share_layers


def apply_share_stage(model: nn.Module, stage: ShareStage, config: CompressionConfig, context: CompressionContext) -> None:
    """Apply the stage to ``model`` in place and record the layer sharing in ``config``."""
    if stage.tie_embeddings:
        tie_embeddings(model, stage.tie_embeddings)
    if stage.layers is None and not stage.every:
        return
    if config.modules:
        raise SharingError("share: the model is already quantized; put share before quantize (a shared weight "
                           "is then quantized once, with the inputs of all its layers)")
    n_layers = len(decoder_blocks(model))
    groups = stage.layers if stage.layers is not None else groups_of(stage.every, n_layers)
    record = share_layers(model, groups, stage.parts, stage.init, stage.lora_rank)
    config.shared = merge_records(config.shared, record)  # compress() registers the tensors to save once
