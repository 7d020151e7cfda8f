"""Rotate a pre-norm transformer's residual stream by an orthogonal ``Q``, folded into its weights.

The result is the same architecture with new weights and the same function (QuaRot, Ashkboos et
al. 2024, section 4; SliceGPT's computational invariance). With the residual stream ``h`` (a row
vector) replaced by ``h Q``:

- RMSNorm without its scale is rotation-equivariant: ``(h Q) / rms(h Q) = (h / rms(h)) Q``,
  because ``Q`` keeps lengths. So each norm's scale ``gamma`` is first folded into the linears that
  read the norm's output (``W <- W diag(gamma)``; the norm's scale becomes one).
- A linear that reads the stream (q/k/v, gate/up, lm_head) computes ``x W^T = (x Q)(W Q)^T``:
  ``W <- W Q``.
- A linear that writes into it (attention output, MLP down) and the embeddings must produce
  ``y Q``: ``W <- Q^T W``, bias ``b <- b Q``, embeddings ``E <- E Q``.

Per head (``heads=True``), values and the attention output rotate too: head ``j``'s values
``v_j R`` (``W_vj <- R^T W_vj``) and the output projection's columns of each query head read by
``R`` (``W_o,i <- W_o,i R``); attention mixes values over tokens only, so this is exact as well.

Which norm feeds which linear is read off one forward pass with hooks (a norm's output is the very
tensor its readers receive), not from names, which differ across families; a norm that is not
RMSNorm-like (LayerNorm subtracts the mean, or has a bias) or a linear that reads the stream
without a norm before it is refused. A tied ``lm_head`` stays tied when the final norm's scale is
all ones; otherwise ``lm_head = E diag(gamma) Q`` differs from the embeddings ``E Q`` and is untied
(no orthogonal rotation commutes with a non-uniform ``diag(gamma)``). Finally the logits of a
probe are compared with the model's before: a family with anything else on the stream (a learned
position embedding, a post-norm) is refused, and the model put back as it was.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..models import ArchitectureError, final_norm, model_configs, model_type
from ..models.stream import StreamMap, map_stream, norm_scale, probe_ids
from ..sharing.embeddings import untie_output_embeddings

logger = logging.getLogger(__name__)


@torch.no_grad()
def rotate_model(model: nn.Module, Q: torch.Tensor, R: torch.Tensor | None = None,
                 stream: StreamMap | None = None, tolerance: float | None = None) -> float:
    """Rotate ``model`` in place by ``Q`` (``[hidden, hidden]``; and its heads by ``R``); return the
    largest change of the probe's logits relative to their largest magnitude."""
    stream = stream or map_stream(model)
    probe = probe_ids(model).to(model.get_input_embeddings().weight.device)
    before = model(input_ids=probe, use_cache=False).logits.double()
    saved = copy.deepcopy(model.state_dict(keep_vars=False))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    try:
        _fold_and_rotate(model, Q, R, stream)
        after = model(input_ids=probe, use_cache=False).logits.double()
    except Exception:
        _restore(model, saved, tied)
        raise
    change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
    dtype = model.get_input_embeddings().weight.dtype
    limit = tolerance if tolerance is not None else (1e-3 if dtype == torch.float32 else 5e-2)
    if not change <= limit:
        _restore(model, saved, tied)
        raise ArchitectureError(f"rotate: the rotated {model_type(model)!r} computes different logits (relative change "
                                f"{change:.2e} > {limit:.0e}): something else reads or writes its residual stream; "
                                "the model is left as it was")
    logger.info("rotate: logits of the probe changed by %.2e (relative): the same function up to rounding", change)
    return change


def _restore(model: nn.Module, saved: dict, tied: bool) -> None:
    if tied and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        for cfg in model_configs(model):
            cfg.tie_word_embeddings = True
    model.load_state_dict(saved, strict=False)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _fold_and_rotate(model: nn.Module, Q: torch.Tensor, R: torch.Tensor | None, stream: StreamMap) -> None:
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    hidden = embed.weight.shape[1]
    Q = Q.to(device=embed.weight.device, dtype=torch.float64)
    final = final_norm(model)
    gamma_final, _ = norm_scale(final, hidden)
    if head.weight is embed.weight and not torch.all(gamma_final == 1):
        untie_output_embeddings(model)  # lm_head = E diag(gamma) Q is not the embeddings E Q any more
    for norm_name, readers in stream.readers.items():
        norm = model.get_submodule(norm_name)
        gamma, unit = norm_scale(norm, hidden)
        for name in readers:
            linear = model.get_submodule(name)
            if linear is head and linear.weight is embed.weight:
                continue  # tied and gamma = 1: rotating the embeddings below rotates lm_head too
            _set(linear.weight, (linear.weight.double() * gamma.to(Q.device)) @ Q)
        norm.weight.fill_(unit)
    for name in stream.writers:
        linear = model.get_submodule(name)
        _set(linear.weight, Q.T @ linear.weight.double())
        if linear.bias is not None:
            _set(linear.bias, linear.bias.double() @ Q)
    _set(embed.weight, embed.weight.double() @ Q)
    if R is not None:
        for values, out, hd in stream.heads:
            _rotate_heads(model.get_submodule(values), model.get_submodule(out), R.to(Q), hd)


def _rotate_heads(values: nn.Linear, out: nn.Linear, R: torch.Tensor, hd: int) -> None:
    """Head ``j``'s values ``v_j R``; the output projection reads each head's columns through ``R``."""
    W = values.weight.double().view(-1, hd, values.in_features)  # (kv_heads, hd, hidden)
    _set(values.weight, (R.T @ W).reshape(values.weight.shape))
    if values.bias is not None:
        _set(values.bias, (values.bias.double().view(-1, hd) @ R).flatten())
    Wo = out.weight.double().view(out.out_features, -1, hd)  # (hidden, heads, hd)
    _set(out.weight, (Wo @ R).reshape(out.weight.shape))
