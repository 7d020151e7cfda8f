"""Distillation losses, pure functions of student and teacher outputs.

- logits: the divergence between the teacher's and the student's next-token distributions at
  temperature ``T``, averaged over the tokens that count (``mask``) and scaled by ``T**2`` so
  that its gradients keep their size as ``T`` changes (Hinton, Vinyals, Dean, 2015):
  forward KL ``KL(p_t || p_s)`` (mode covering, the classic choice), reverse KL
  ``KL(p_s || p_t)`` (mode seeking, MiniLLM), or the generalized Jensen-Shannon divergence of
  GKD, ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``,
  as TRL's ``GKDTrainer`` defines it (``beta`` 0: forward KL, 1: reverse KL, 0.5: the JSD);
- hidden states: mean squared error between a student layer's output (through a learned linear
  projection when the widths differ) and its mapped teacher layer (TinyBERT, Minitron);
- attention maps: ``KL`` between the teacher's and the student's attention distributions, averaged
  over heads (so that a student with fewer heads can still learn them; MiniLM).

>>> import torch
>>> s = torch.tensor([[[0.0, 0.0]]]); t = torch.tensor([[[0.0, 0.0]]])
>>> float(logit_divergence(s, t))
0.0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..recipe import DIVERGENCES  # one list, with the recipe's check


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def logit_divergence(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                     kind: str = "forward", mask: torch.Tensor | None = None, beta: float = 0.5) -> torch.Tensor:
    """Mean over tokens of the divergence between ``softmax(teacher / T)`` and ``softmax(student / T)``.

    ``student``/``teacher``: ``[..., vocab]`` logits (computed in float32); ``mask``: ``[...]``,
    nonzero where a token counts. Returns ``T**2`` times the mean divergence.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"student and teacher vocabularies differ ({student.shape[-1]} vs {teacher.shape[-1]})")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    if kind == "jsd" and beta in (0, 1):  # the limits of the generalized JSD, as TRL takes them
        kind = "forward" if beta == 0 else "reverse"
    if kind == "forward":
        per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif kind == "reverse":
        per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
        per_token = (beta * (log_t.exp() * (log_t - log_m)).sum(-1)
                     + (1 - beta) * (log_s.exp() * (log_s - log_m)).sum(-1))
    return temperature**2 * _masked_mean(per_token, mask)


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], layer_map: dict[int, int],
               projections: torch.nn.ModuleDict | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over mapped layers of the per-token mean squared error of hidden states.

    ``student``/``teacher``: hidden states per layer, ``[batch, seq, width]``, as transformers
    returns them (index 0 is the embedding output, index ``i`` the output of block ``i - 1``);
    ``layer_map``: student index -> teacher index; ``projections[str(i)]`` maps student layer
    ``i`` to the teacher's width.
    """
    losses = []
    for s_index, t_index in layer_map.items():
        s = student[s_index].float()
        if projections is not None and str(s_index) in projections:
            s = projections[str(s_index)](s)
        t = teacher[t_index].float()
        if s.shape != t.shape:
            raise ValueError(f"hidden states of student layer {s_index} {tuple(s.shape)} and teacher layer "
                             f"{t_index} {tuple(t.shape)} differ: give a projection (widths differ)")
        losses.append(_masked_mean(((s - t) ** 2).mean(-1), mask))
    return torch.stack(losses).mean()


def attention_kl(student: list[torch.Tensor], teacher: list[torch.Tensor], layer_map: dict[int, int],
                 mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """Mean over mapped layers of ``KL(teacher || student)`` of head-averaged attention maps.

    ``student``/``teacher``: attention probabilities per block, ``[batch, heads, seq, seq]``
    (block indices, not hidden-state indices); ``mask`` ``[batch, seq]`` selects query rows.
    """
    losses = []
    for s_index, t_index in layer_map.items():
        s = student[s_index].float().mean(1)
        t = teacher[t_index].float().mean(1)
        per_row = (t * (torch.log(t + eps) - torch.log(s + eps))).sum(-1)
        losses.append(_masked_mean(per_row, mask))
    return torch.stack(losses).mean()
