"""Structured pruning: attention heads (GQA-aware), FFN channels, hidden channels, whole layers.

``importance.py`` scores units, ``select.py`` chooses what goes, ``layout.py`` knows each family's
modules and slices them, ``stage.py`` runs the ``prune`` stage and rebuilds pruned shapes on load.
"""

from .layout import FAMILIES, LayerSizes, PruningError, family_of
from .stage import apply_prune_stage, rebuild_pruned_structure

__all__ = ["FAMILIES", "LayerSizes", "PruningError", "apply_prune_stage", "family_of", "rebuild_pruned_structure"]
