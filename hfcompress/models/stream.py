"""The residual stream of a pre-norm transformer: which norm feeds which linears, and who writes it.

Rotations (``rotation/``) and activation-aware scaling (``quantization/awq.py``) both fold a
norm's scale into the linears that read the norm's output. Which linears those are is read off
one forward pass with hooks (a norm's output is the very tensor its readers receive), not from
module names, which differ across families; a linear of a block that reads the stream without a
norm before it is refused, and so is a norm that is not RMSNorm-like (LayerNorm subtracts the
mean, or has a bias).

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...                                      num_attention_heads=4, vocab_size=50))
>>> stream = map_stream(model)
>>> stream.readers["model.layers.0.post_attention_layernorm"]
['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj']
>>> stream.writers
['model.layers.0.self_attn.o_proj', 'model.layers.0.mlp.down_proj']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import ArchitectureError, decoder_blocks, final_norm, model_type
from .layout import block_layout


@dataclass
class StreamMap:
    """The residual stream's readers and writers, by module name."""

    readers: dict[str, list[str]] = field(default_factory=dict)  # norm -> the linears reading its output
    writers: list[str] = field(default_factory=list)  # attention outputs, MLP downs
    heads: list[tuple[str, str, int]] = field(default_factory=list)  # (values, attention output, head size)


def probe_ids(model: nn.Module) -> torch.Tensor:
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
            raise ArchitectureError(f"the layers of {model_type(model)!r} are not attention + dense MLP blocks "
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
        raise ArchitectureError(f"{type(model).__name__} has no final norm and lm_head (a causal LM head reading the stream)")
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
            model(input_ids=probe_ids(model).to(model.get_input_embeddings().weight.device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in candidates if n not in read]
    if missing:
        raise ArchitectureError(f"{missing[0]} of {model_type(model)!r} does not read a normalization's output "
                                "directly, so the norm's scale cannot be folded into it")
    for name, norm in read.items():
        stream.readers.setdefault(norm, []).append(name)
    return stream


def norm_scale(norm: nn.Module, hidden: int) -> tuple[torch.Tensor, float]:
    """The norm's effective scale ``gamma`` and the weight value that makes it one (1 for
    ``gamma = w``; 0 for Gemma's ``gamma = 1 + w``), checking that the norm is RMSNorm-like."""
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    if not isinstance(weight, nn.Parameter) or (isinstance(bias, torch.Tensor) and bias.abs().max() > 0):
        raise ArchitectureError(f"{type(norm).__name__} has a bias or no scale: not an RMSNorm")
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
    raise ArchitectureError(f"{type(norm).__name__} is not an RMSNorm (x / rms(x) * scale): a LayerNorm "
                            "subtracts the mean, which a rotation does not keep")
