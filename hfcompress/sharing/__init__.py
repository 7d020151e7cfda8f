"""Weight sharing: tied embeddings and decoder layers that share their attention and/or MLP.

``embeddings.py`` ties ``lm_head`` to the input embeddings (transformers' own tie, declared in the
config, so the folder stays a plain checkpoint); ``layers.py`` makes groups of decoder layers use
one set of linear modules (optionally with per-layer low-rank corrections), stores each shared
tensor once and re-ties on load; ``stage.py`` runs the ``share`` stage.
"""

from .embeddings import tie_embeddings
from .layers import (SharedLinearDelta, SharingError, rebuild_shared_structure, register_shared_tensors,
                     share_layers, shared_tensor_names, tie_shared_modules)
from .stage import apply_share_stage

__all__ = ["SharedLinearDelta", "SharingError", "apply_share_stage", "rebuild_shared_structure",
           "register_shared_tensors", "share_layers", "shared_tensor_names", "tie_embeddings", "tie_shared_modules"]
