"""Plans that cut and quantize together: each decoder layer's heads or FFN channels cut, and each
of its projections' formats, chosen under one budget.

A cut and the formats of the projections it shrinks are not separable: the bytes a format takes
depend on the shapes the cut leaves. So a layer's attention (query, key, value and output
projections) and its FFN (gate, up, down) are each one :class:`~hfcompress.planning.planner.Group`
of the knapsack, with, under each cut (:mod:`.pruning`),

    cost of format o for projection j = kept fraction x its cost uncut
    bytes of format o for projection j = its bytes quantized at the shape the cut leaves

and the cut's own cost added once. The planner's program goes through the group once per cut and
keeps the cheapest at every budget, so the plan is exact over every combination of cuts and
formats. Layers outside a prunable group (a projection ``ignore`` keeps in float leaves its
layer's group incomplete) keep their own formats alone.
"""

from __future__ import annotations

import torch

from .planner import Group, Menu, PlanError
from .sensitivity import Sensitivity, stored_nbytes


class JointMenu(Menu):
    """The sensitivity's layers with the cuts it priced: one group per cut kind and decoder layer."""

    def __init__(self, sensitivity: Sensitivity):
        if sensitivity.prune is None or not sensitivity.prune.costs:
            raise PlanError("this sensitivity prices no cuts; measure it with the prune options "
                            "(hfcompress plan --prune heads,ffn)")
        row = {name: i for i, name in enumerate(sensitivity.modules)}
        cost, nbytes = sensitivity.cost.double(), sensitivity.nbytes.double()
        groups = []
        for kind, costs in sensitivity.prune.costs.items():
            for r, block in enumerate(costs.blocks):
                members = costs.members[r]
                rows = [row[name] for name, *_ in members]
                kept = costs.kept[r].tolist()
                group_cost = torch.stack([f * cost[rows] for f in kept])
                group_bytes = torch.stack([torch.stack([_bytes(sensitivity, m, f, nbytes[i]) for m, i in zip(members, rows)])
                                           for f in kept])
                groups.append(Group(kind, block, rows, costs.cost[r].double(), group_cost, group_bytes))
        super().__init__(sensitivity, groups)


def _bytes(sensitivity: Sensitivity, member, kept: float, uncut: torch.Tensor) -> torch.Tensor:
    """Bytes of one projection in each format at the shape a cut keeping ``kept`` of it leaves."""
    if kept == 1.0:
        return uncut
    name, axis, in_features, out_features, bias = member
    if axis == "out":
        out_features = round(out_features * kept)
    else:
        in_features = round(in_features * kept)
    return torch.tensor([stored_nbytes(in_features, out_features, sensitivity.linear_format(bits, group), bias)
                         for bits, group in sensitivity.options], dtype=torch.float64)
