"""How much of the decoder a quantize stage actually quantized: never silently partial.

The decoder's weights are the matrices inside its blocks: linear layers, experts (unfused or
still 3-D), routers and anything else with a weight matrix (convolutions and embeddings aside).
After a stage, :func:`float_share` counts the elements still in float by module type, so a stage
that was asked for 4 bits but left a model's experts in float says so (a warning naming the
modules above :data:`FLOAT_SHARE_LIMIT`, an error with ``strict: true``).

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...                                      num_attention_heads=4, vocab_size=50))
>>> share = float_share(model)
>>> share.fraction, sorted(share.by_type)
(1.0, ['mlp', 'self_attn'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..models import block_names, decoder_blocks, is_linear, linear_weight, raw_weights

FLOAT_SHARE_LIMIT = 0.10


@dataclass
class FloatShare:
    """Weight elements of the decoder's blocks: total, still in float, by module type and by module."""

    total: int = 0
    float: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    modules: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.float / self.total if self.total else 0.0

    def describe(self) -> str:
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(self.by_type.items()))
        return f"{self.float:,} of {self.total:,} weight elements ({self.fraction:.1%}) in float ({kinds or 'none'})"


def _packed_elements(module: nn.Module) -> int | None:
    """Elements a packed module stands for (``in_features * out_features``), None if not packed."""
    if hasattr(module, "qweight") and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features * module.out_features
    packed = getattr(module, "packed_elements", None)
    return packed() if callable(packed) else None


def _kind(sub: str) -> str:
    parts = sub.split(".")
    if any(part in ("gate", "router", "shared_expert_gate") for part in parts[-2:]):
        return "router"
    if any("expert" in part for part in parts):
        return "experts"
    return parts[0]


def float_share(model: nn.Module) -> FloatShare:
    """Count the weight matrices of the model's decoder blocks, quantized or not: linear layers
    (float or packed), packed tensors, and the raw weights models multiply themselves."""
    share = FloatShare()
    for name, block in zip(block_names(model), decoder_blocks(model)):
        for sub, module in block.named_modules():
            packed = _packed_elements(module)
            if packed is not None:
                share.total += packed
            elif is_linear(module):
                _count_float(share, f"{name}.{sub}.weight", sub, linear_weight(module).numel())
        for full, param in raw_weights(block, prefix=name).items():
            _count_float(share, full, full[len(name) + 1:], param.numel())
    return share


def _count_float(share: FloatShare, full: str, sub: str, count: int) -> None:
    share.total += count
    share.float += count
    share.modules[full] = count
    kind = _kind(sub)
    share.by_type[kind] = share.by_type.get(kind, 0) + count
