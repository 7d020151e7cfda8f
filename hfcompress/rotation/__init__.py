"""Rotations of the residual stream, folded into the weights (the ``rotate`` stage).

:mod:`.hadamard` builds the orthogonal matrices, :mod:`.fold` folds norms and a rotation into a
model, :mod:`.stage` runs it from a recipe.
"""

from .fold import map_stream, rotate_model
from .hadamard import hadamard, random_rotation

__all__ = ["hadamard", "map_stream", "random_rotation", "rotate_model"]
