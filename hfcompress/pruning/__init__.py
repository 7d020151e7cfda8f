"""Structured pruning: attention heads (GQA-aware), FFN channels, hidden channels, whole layers.

``importance.py`` scores units, ``select.py`` chooses what goes, ``layout.py`` slices blocks by
the roles the model registry reads, ``stage.py`` runs the ``prune`` stage and rebuilds pruned
shapes on load; ``experts.py`` drops whole experts of MoE layers.
"""

from .layout import LayerSizes, PruningError, PruningLayout, layout_of
from .stage import apply_prune_stage, rebuild_pruned_structure

__all__ = ["LayerSizes", "PruningError", "PruningLayout", "apply_prune_stage", "layout_of", "rebuild_pruned_structure"]
