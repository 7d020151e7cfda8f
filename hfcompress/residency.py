"""Where a model's weights are while it is compressed: in memory (the usual case), or on disk and
brought in one unit (a decoder block, the embedding table) at a time (:mod:`hfcompress.layerwise`).

The block-by-block loops (``calibration.walk_blocks``, RTN) ask through :func:`resident` for a
unit's weights to be in memory while they work on it; for an ordinary model that is a no-op. The
disk-backed store attaches itself to the model under :data:`STORE_ATTRIBUTE`, so that these loops
need no import of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

STORE_ATTRIBUTE = "_hfcompress_weights_on_disk"


def store_of(model: nn.Module):
    """The disk-backed weight store of ``model``, or None when its weights are in memory."""
    return model.__dict__.get(STORE_ATTRIBUTE)


def resident(model: nn.Module, unit: str | None):
    """A context in which the weights of ``model``'s submodule ``unit`` are in memory; what is
    done to them inside is kept (written back to disk on leaving) for a disk-backed model."""
    store = store_of(model)
    return store.hold(unit) if store is not None and unit is not None else contextlib.nullcontext()


def home_device(model: nn.Module) -> torch.device:
    """Where the model's weights live between uses: the CPU for a disk-backed model (its resting
    tensors are on the meta device), else the device of its first parameter."""
    if store_of(model) is not None:
        return torch.device("cpu")
    return next(model.parameters()).device


def by_unit(model: nn.Module, names: Iterable[str]) -> list[tuple[str | None, list[str]]]:
    """``names`` (dotted module names) grouped by the unit holding them, in order; one group with
    unit None for a model in memory."""
    names = list(names)
    store = store_of(model)
    if store is None:
        return [(None, names)] if names else []
    groups: list[tuple[str | None, list[str]]] = []
    for name in names:
        unit = store.unit_of(name)
        if groups and groups[-1][0] == unit:
            groups[-1][1].append(name)
        else:
            groups.append((unit, [name]))
    return groups
