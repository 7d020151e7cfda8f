"""Which heads, channels and layers to keep, given scores and a stage's amounts.

Units are what can be removed together:

- heads with ``gqa: groups``: a key/value head with its query heads (without GQA, a head);
- heads with ``gqa: per_group``: a "slot", one query head from every key/value group (the k-th
  least important of each group), so that every group keeps the same number of query heads;
- FFN channels: one channel.

``uniform: true`` removes the same number of units from every layer (each layer its own least
important ones); ``uniform: false`` removes the same total, ranked across layers, and keeps at
least one unit in every layer. Amounts are per layer: a fraction of the layer's heads or
channels, or a count. A heads amount that is not a whole number of units rounds to the nearest
one, and the log says so.

>>> remove_count(0.3334, 9, 3, "heads")
3
>>> remove_count(4, 12, 1, "heads")
4
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .layout import LayerSizes, PruningError

logger = logging.getLogger(__name__)


def remove_count(amount: float | int, total: int, unit: int, what: str, log: bool = True) -> int:
    """How many of ``total`` items to remove, a multiple of ``unit``, from a fraction or a count
    (``log``: say when it rounds; a check before the stage runs stays quiet)."""
    wanted = amount * total if isinstance(amount, float) else amount
    if isinstance(amount, int) and amount > total:
        raise PruningError(f"{what}: cannot remove {amount} of {total}: a layer has only {total} {what}")
    units = round(wanted / unit)
    if units * unit != wanted and log:
        # 0.3334 of 9 heads is 3 for all purposes: only a real rounding is a warning.
        level = logging.WARNING if abs(units * unit - wanted) >= 0.05 * unit else logging.INFO
        logger.log(level, "%s: removing %s of %d is not a whole number of units of %d; rounding to %d",
                   what, f"{wanted:g}", total, unit, units * unit)
    if units * unit >= total:
        raise PruningError(
            f"{what}: removing {units * unit} of {total} leaves none; ask for fewer (a fraction below "
            f"{(total - unit) / total:.3f} or a count below {total})"
        )
    return units * unit


@dataclass
class Unit:
    score: float
    heads: list[int]  # query heads it removes
    kv_heads: list[int]  # key/value heads it removes


def head_units(sizes: LayerSizes, heads: torch.Tensor, kv_heads: torch.Tensor, gqa: str) -> list[Unit]:
    """The removable head units of one layer, least important first."""
    H, KV = sizes.heads, sizes.kv_heads
    rep = H // KV
    units = []
    if gqa == "groups":
        for j in range(KV):
            members = list(range(j * rep, (j + 1) * rep))
            units.append(Unit(abs(float(heads[members].sum() + kv_heads[j])), members, [j]))
    else:
        order = [sorted(range(j * rep, (j + 1) * rep), key=lambda h: abs(float(heads[h]))) for j in range(KV)]
        for k in range(rep):
            members = sorted(group[k] for group in order)
            units.append(Unit(sum(abs(float(heads[h])) for h in members), members, []))
        return units  # slots must go in order: the k-th least important of each group before the (k+1)-th
    return sorted(units, key=lambda u: u.score)


def choose(per_layer: list[list[float]], remove_per_layer: int | list[int], uniform: bool,
           ordered: bool = False) -> list[set[int]]:
    """Indices to remove in each layer: ``remove_per_layer`` each (or each layer its own count, a
    list, with ``uniform``), or that many on average.

    ``per_layer[l]`` holds the scores of layer ``l``'s units. With ``ordered`` the units of a
    layer must go in the order given (GQA slots), whatever their scores.
    """
    if isinstance(remove_per_layer, list):
        if not uniform:
            raise PruningError("per-layer amounts remove each layer's own least important units (uniform: true)")
        counts = remove_per_layer
    else:
        counts = [remove_per_layer] * len(per_layer)
    if uniform:
        if ordered:
            return [set(range(n)) for n in counts]
        return [set(torch.tensor(s).argsort()[:n].tolist()) if n else set() for s, n in zip(per_layer, counts)]
    # Within a layer, units are ranked by score (GQA slots: their scores rise with their order), so
    # taking candidates in global (score, rank) order never skips ahead inside a layer.
    total = remove_per_layer * len(per_layer)
    candidates = []
    for layer, scores in enumerate(per_layer):
        ranked = range(len(scores)) if ordered else torch.tensor(scores).argsort(stable=True).tolist()
        candidates += [(scores[i], rank, layer, i) for rank, i in enumerate(ranked)]
    candidates.sort()
    removed: list[set[int]] = [set() for _ in per_layer]
    count = 0
    for score, rank, layer, i in candidates:
        if count == total:
            break
        if len(removed[layer]) + 1 < len(per_layer[layer]):  # every layer keeps at least one unit
            removed[layer].add(i)
            count += 1
    return removed
