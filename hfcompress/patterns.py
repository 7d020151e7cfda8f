"""Module-name patterns as recipes write them (``ignore``, ``include``, ``overrides``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches a glob pattern, as a full name or as a dotted suffix.

    ``"lm_head"`` matches ``lm_head``; ``"mlp.down_proj"`` matches every layer's
    ``model.layers.N.mlp.down_proj``; ``"model.layers.0.*"`` matches what is under layer 0.
    """
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)
