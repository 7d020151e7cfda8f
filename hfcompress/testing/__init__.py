"""Test helpers: tiny random models of every causal-LM type that transformers registers."""

from . import tiny
from .tiny import *  # noqa: F403  (the public names are tiny.__all__)

__all__ = list(tiny.__all__)
