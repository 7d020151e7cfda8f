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
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import ArchitectureError, decoder_blocks, final_norm, model_configs, model_type
from ..models.layout import block_layout
from ..sharing.embeddings import untie_output_embeddings

logger = logging.getLogger(__name__)


@dataclass
class StreamMap:
    """The residual stream's readers and writers, by module name."""

    readers: dict[str, list[str]] = field(default_factory=dict)  # norm -> the linears reading its output
    writers: list[str] = field(default_factory=list)  # attention outputs, MLP downs
    heads: list[tuple[str, str, int]] = field(default_factory=list)  # (values, attention output, head size)


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    return (torch.arange(1, 17) * 7919 % vocab).view(1, 16)


def map_stream(model: nn.Module) -> StreamMap:
    """Which norms feed which linears (from hooks on one forward pass), and the stream's writers."""
    stream = StreamMap()
    blocks = decoder_blocks(model)
    names = {module: name for name, module in model.named_modules()}
    norms, candidates = [], []
    for block in blocks:
        layout = block_layout(model, block)
        if layout is None or layout.mlp is None:
            raise ArchitectureError(f"rotate: the layers of {model_type(model)!r} are not attention + dense MLP blocks "
                                    "(experts, Mamba mixers or multi-head latent attention do not rotate yet)")
        prefix = names[block]
        att, mlp = layout.attention, layout.mlp
        norms += [f"{prefix}.{n}" for n in layout.norms]
        candidates += [f"{prefix}.{n}" for n in (att.qkv,) if n] + [f"{prefix}.{n}" for n in (att.q, att.k, att.v) if n]
        candidates += [f"{prefix}.{n}" for n in (*mlp.inputs, *mlp.fused)]
        stream.writers += [f"{prefix}.{att.out}", f"{prefix}.{mlp.out}"]
        if att.v:
            stream.heads.append((f"{prefix}.{att.v}", f"{prefix}.{att.out}", layout.head_dim))
    last = final_norm(model)
    head = model.get_output_embeddings()
    if last is None or head is None:
        raise ArchitectureError(f"rotate: {type(model).__name__} has no final norm and lm_head to rotate")
    norms.append(names[last])
    candidates.append(names[head])

    produced: dict[tuple, str] = {}
    read: dict[str, str] = {}
    alive = []  # every norm output is kept until the pass ends, so that no two share an address

    def key(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.shape[-1]

    def on_norm(name):
        def hook(module, args, out):  # returns None: a hook's return value would replace the output
            alive.append(out)
            produced[key(out)] = name
        return hook

    def on_linear(name):
        def hook(module, args):
            source = produced.get(key(args[0]))
            if source is not None:
                read[name] = source
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(on_norm(n)) for n in norms]
    hooks += [model.get_submodule(n).register_forward_pre_hook(on_linear(n)) for n in candidates]
    try:
        with torch.no_grad():
            model(input_ids=_probe_ids(model).to(model.get_input_embeddings().weight.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in candidates if n not in read]
    if missing:
        raise ArchitectureError(f"rotate: {missing[0]} of {model_type(model)!r} does not read a normalization's output "
                                "directly, so the norm's scale cannot be folded into it")
    for name, norm in read.items():
        stream.readers.setdefault(norm, []).append(name)
    return stream


def _norm_scale(norm: nn.Module, hidden: int) -> tuple[torch.Tensor, float]:
    """The norm's effective scale ``gamma`` and the weight value that makes it one (1 for
    ``gamma = w``; 0 for Gemma's ``gamma = 1 + w``), checking that the norm is RMSNorm-like."""
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if not isinstance(weight, nn.Parameter) or (isinstance(bias, torch.Tensor) and bias.abs().max() > 0):
        raise ArchitectureError(f"rotate: {type(norm).__name__} has a bias or no scale: not an RMSNorm")
    x = torch.randn(4, hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(weight) + 1
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            for unit in (1.0, 0.0):
                weight.fill_(unit)
                y = norm(x).double()
                plain = x.double() / x.double().pow(2).mean(-1, keepdim=True).sqrt()
                if torch.allclose(y, plain, rtol=1e-2, atol=1e-2):
                    gamma = original.double() if unit == 1.0 else 1 + original.double()
                    return gamma, unit
    finally:
        with torch.no_grad():
            weight.copy_(original)
    raise ArchitectureError(f"rotate: {type(norm).__name__} is not an RMSNorm (x / rms(x) * scale): a LayerNorm "
                            "subtracts the mean, which a rotation does not keep")


@torch.no_grad()
def rotate_model(model: nn.Module, Q: torch.Tensor, R: torch.Tensor | None = None,
                 stream: StreamMap | None = None, tolerance: float | None = None) -> float:
    """Rotate ``model`` in place by ``Q`` (``[hidden, hidden]``; and its heads by ``R``); return the
    largest change of the probe's logits relative to their largest magnitude."""
    stream = stream or map_stream(model)
    probe = _probe_ids(model).to(model.get_input_embeddings().weight.device)
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
    head_name = next(n for n, m in model.named_modules() if m is head)
    final = model.get_submodule(next(n for n, m in model.named_modules() if m is final_norm(model)))
    gamma_final, _ = _norm_scale(final, hidden)
    if head.weight is embed.weight and not torch.all(gamma_final == 1):
        untie_output_embeddings(model)  # lm_head = E diag(gamma) Q is not the embeddings E Q any more
    for norm_name, readers in stream.readers.items():
        norm = model.get_submodule(norm_name)
        gamma, unit = _norm_scale(norm, hidden)
        for name in readers:
            linear = model.get_submodule(name)
            if name == head_name and linear.weight is embed.weight:
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
