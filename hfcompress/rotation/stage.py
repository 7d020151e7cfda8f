"""The ``rotate`` recipe stage: one orthogonal rotation of the residual stream (and, optionally,
one per attention head for values and outputs), folded into the weights: see :mod:`.fold`."""

from __future__ import annotations

import logging

from torch import nn

from ..config import CompressionConfig
from ..context import CompressionContext
from ..models import ArchitectureError
from ..models.layout import hidden_size
from ..recipe import RotateStage
from .fold import map_stream, rotate_model
from .hadamard import random_rotation

logger = logging.getLogger(__name__)


def apply_rotate_stage(model: nn.Module, stage: RotateStage, config: CompressionConfig,
                       context: CompressionContext) -> None:
    try:
        stream = map_stream(model)
    except ArchitectureError as err:
        raise ArchitectureError(f"rotate: {err}") from None
    Q = random_rotation(hidden_size(model), stage.seed, stage.method)
    R = None
    if stage.heads and stream.heads:
        R = random_rotation(stream.heads[0][2], stage.seed + 1, stage.method)
    change = rotate_model(model, Q, R, stream)
    logger.info("rotate: %s rotation of the residual stream (%d) %s; probe logits changed by %.1e",
                stage.method, Q.shape[0], f"and of each head ({R.shape[0]})" if R is not None else "", change)
