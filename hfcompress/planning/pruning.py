"""Prune options for the planner: what removing attention heads or FFN channels from one decoder
layer costs the model, priced the way the quantization options are, and what it saves.

Removing a layer's FFN channels ``S`` is exactly zeroing columns ``S`` of its output projection
(``down_proj``): the other projections only feed those columns. Removing a key/value group with
its query heads is likewise zeroing the output projection's columns of those heads. The
second-order cost of :mod:`.sensitivity`, ``1/2 tr(G D A D^T)`` with ``D`` the change of the
output projection's weight, therefore prices a cut too, with ``D = -W[:, S]``:

    cost = 1/2 tr(G W_S A_SS W_S^T)

where ``A`` and ``G`` are the output projection's own statistics, already collected for its
quantization options. Which units go is the prune stage's own choice (activation importance,
Minitron; each layer its least important units), from the scores measured here and handed to
the stage in the planned recipe (``prune.scores``), so the units priced are the units cut.

A layer that keeps a fraction ``f`` of its heads or channels keeps ``f`` of its projections' rows
(query, key, value, gate, up) and of its output projection's columns: their quantized bytes are
counted at the new shapes, and their quantization costs taken as ``f`` of the unpruned ones (the
removed rows' and columns' errors go with them).

The costs are those of a one-shot cut. Minitron recovers much of a cut's loss by distillation,
which this plan does not include: it prices what ``compress`` does with the planned recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..models import block_names, decoder_blocks, linear_shape, linear_weight
from ..models.layout import LayerSizes, head_channels
from ..pruning.importance import Scores, activation_scores
from ..pruning.layout import PruningError, layout_of
from ..pruning.select import choose, head_units, remove_count

logger = logging.getLogger(__name__)

PRUNE_KINDS = ("heads", "ffn")
FFN_AMOUNTS = (0.25, 0.5)  # fractions of a layer's FFN channels
HEAD_FRACTIONS = (0.25, 0.5)  # of a layer's key/value groups, rounded down to whole groups (at least one)


@dataclass
class PruneCosts:
    """The cuts of one kind (``heads`` or ``ffn``): one row per decoder layer that can take them,
    one column per amount (column 0: nothing removed)."""

    kind: str
    blocks: list[int]  # the decoder layer of each row
    amounts: list[float | int]  # as the prune stage takes them: heads a count of query heads, ffn a fraction
    kept: torch.Tensor  # [B, A] fraction of the heads or channels each amount keeps
    cost: torch.Tensor  # [B, A] predicted loss increase, nats per token
    members: list[list[tuple[str, str, int, int, bool]]]  # per row: (module, axis cut "out"|"in", in, out, bias)

    def metadata(self) -> dict:
        return {"blocks": self.blocks, "amounts": self.amounts, "members": self.members}

    @classmethod
    def from_saved(cls, kind: str, metadata: dict, tensors: dict[str, torch.Tensor]) -> PruneCosts:
        return cls(kind, metadata["blocks"], metadata["amounts"], tensors[f"prune.{kind}.kept"],
                   tensors[f"prune.{kind}.cost"], [[tuple(m) for m in row] for row in metadata["members"]])


@dataclass
class PruneMeasure:
    """Everything the planner knows about cuts: the costs per kind, the importance scores that say
    which units each amount removes, and the head size (to turn heads into columns)."""

    costs: dict[str, PruneCosts]
    scores: Scores
    head_dim: int

    def removed(self, kind: str, block: int, amount: float | int) -> list[int]:
        """Columns of layer ``block``'s output projection that ``amount`` removes (the prune stage's choice)."""
        if kind == "ffn":
            ffn = self.scores.ffn[block]
            n = remove_count(amount, len(ffn), 1, "FFN channels", log=False)
            return sorted(choose([ffn.abs().tolist()], [n], uniform=True)[0]) if n else []
        heads, kv_heads = self.scores.heads[block], self.scores.kv_heads[block]
        units = head_units(LayerSizes(len(heads), len(kv_heads), 0), heads, kv_heads, "groups")
        n = remove_count(amount, len(heads), len(heads) // len(kv_heads), "heads", log=False) // (len(heads) // len(kv_heads))
        gone = choose([[u.score for u in units]], [n], uniform=True)[0] if n else set()
        return head_channels([h for k in gone for h in units[k].heads], self.head_dim).tolist()


def _cut_cost(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, columns: list[int]) -> float:
    """``1/2 tr(G W_S A_SS W_S^T)``: the loss increase of zeroing ``columns`` of ``W``, to second order."""
    if not columns:
        return 0.0
    S = torch.as_tensor(columns)
    W_S = W[:, S]
    return 0.5 * float(torch.sum((G @ W_S) * (W_S @ A[S][:, S])))


def head_amounts(heads: int, kv_heads: int) -> list[int]:
    """Query heads to remove, whole key/value groups (with their query heads) at a time."""
    rep = heads // kv_heads
    groups = sorted({max(1, int(f * kv_heads)) for f in HEAD_FRACTIONS if kv_heads > 1})
    return [g * rep for g in groups if g < kv_heads]


@torch.no_grad()
def measure_prune_costs(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor, statistics,
                        kinds: tuple[str, ...]) -> PruneMeasure:
    """Costs of the ``kinds`` of cuts in every decoder layer whose projections are all ``targets``,
    from ``statistics`` (the sensitivity's per-layer ``A`` and ``G``) and activation scores."""
    unknown = [k for k in kinds if k not in PRUNE_KINDS]
    if unknown:
        raise PruningError(f"prune options {unknown} are not cuts the planner prices; valid: {', '.join(PRUNE_KINDS)}")
    try:
        layout = layout_of(model, mlp="ffn" in kinds)
    except PruningError as err:
        raise PruningError(f"plan --prune: {err}") from None
    device = next(p for p in model.parameters() if not p.is_meta).device
    scores = activation_scores(model, layout, windows, device, torch.float32)
    measure = PruneMeasure({}, scores, layout.head_dim())
    for kind in kinds:
        part = layout.attention if kind == "heads" else layout.mlp
        rows, blocks, amounts, kept, cost = [], [], None, [], []
        for b, (prefix, block) in enumerate(zip(block_names(model), decoder_blocks(model))):
            names = [f"{prefix}.{path}" for path in part.projections]
            if not all(name in targets for name in names):
                continue  # a layer the quantize stage leaves alone (ignore:) is not planned
            sizes = layout.sizes(block)
            here = head_amounts(sizes.heads, sizes.kv_heads) if kind == "heads" else list(FFN_AMOUNTS)
            if amounts is None:
                amounts = [0, *here]
            elif [0, *here] != amounts:
                raise PruningError("plan --prune: the model's layers differ in head counts; plan them unpruned")
            out = f"{prefix}.{part.out}"
            W = linear_weight(targets[out]).detach().float()
            A, G = statistics.hessian(out) / 2, statistics.gradient(out)
            removed = [measure.removed(kind, b, a) for a in amounts]
            cost.append([_cut_cost(W, A, G, columns) for columns in removed])
            width = W.shape[1]
            kept.append([1 - len(columns) / width for columns in removed])
            rows.append([(name, "in" if name == out else "out", *linear_shape(targets[name]),
                          getattr(targets[name], "bias", None) is not None) for name in names])
            blocks.append(b)
        if not blocks:
            logger.warning("plan --prune %s: no decoder layer has all its projections quantized; nothing to prune", kind)
            continue
        measure.costs[kind] = PruneCosts(kind, blocks, amounts, torch.tensor(kept, dtype=torch.float64),
                                 torch.tensor(cost, dtype=torch.float32), rows)
    return measure
