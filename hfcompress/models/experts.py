"""Mixture-of-Experts: transformers' fused 3-D expert weights, unfused into one linear per expert.

transformers 5 stores the experts of a MoE layer as 3-D parameters of one module
(``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, or transposed, with optional biases)
and describes their layout with flags (``has_gate``, ``is_transposed``, ``is_concatenated``,
``has_bias``, ``has_post_expert_norm``) set by its ``use_experts_implementation`` decorator.
:class:`ExpertLinears` turns such a module into ``E`` small ``Expert`` modules of ordinary
linear layers (``experts.3.gate_up_proj``, ``experts.3.down_proj``), as llm-compressor unfuses
them, with a forward pass that computes what the fused one computes. From there on an expert is
just linear layers: GPTQ sees each expert's own tokens through the usual hooks, quantization
swaps the linears for packed ones (each expert its own groups, the GPTQ layout), the kernels
run them one expert at a time, and a save stores each packed tensor once.

The gating of the fused gate/up output is the model's own (``_apply_gate`` of its experts class:
SwiGLU for most, gpt-oss's clamped variant on interleaved columns), so unfusing never changes the
maths. With ``calibrate_all`` every expert runs on every token (its hooks see them all, which
gives rarely routed experts a full Hessian), while only the routed outputs are summed, so the
next layer receives exactly what the model computes.

>>> import torch
>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> model = MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, vocab_size=64)).eval()
>>> ids = torch.randint(0, 64, (1, 8))
>>> before = model(ids).logits
>>> names = unfuse_experts(model)
>>> names, type(model.model.layers[0].mlp.experts).__name__
(['model.layers.0.mlp.experts'], 'ExpertLinears')
>>> torch.allclose(model(ids).logits, before, atol=1e-5)
True
"""

from __future__ import annotations

import torch
from torch import nn

# Names under which transformers' experts modules receive the routing (positional in most models).
_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices", "indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "router_scores", "topk_weights", "weights")


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module with the standard 3-D layout (``use_experts_implementation``)."""
    first = getattr(module, "gate_up_proj", None) if getattr(module, "has_gate", True) else getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    return (hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and isinstance(first, nn.Parameter) and first.dim() == 3
            and isinstance(down, nn.Parameter) and down.dim() == 3)


def find_fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if is_fused_experts(m)}


def find_expert_linears(model: nn.Module) -> dict[str, ExpertLinears]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLinears)}


class Expert(nn.Module):
    """One expert: ``gate_up_proj`` (or ``up_proj`` without a gate) then ``down_proj``."""

    def __init__(self, first_name: str, first: nn.Module, down: nn.Module):
        super().__init__()
        self.first_name = first_name
        setattr(self, first_name, first)
        self.down_proj = down

    @property
    def first(self) -> nn.Module:
        return getattr(self, self.first_name)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (``[out, in]``, or ``[in, out]`` when ``transposed``)."""
    weight = weight.t() if transposed else weight
    with torch.device(weight.device):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    if weight.device.type != "meta":
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    return layer


class ExpertLinears(nn.Module):
    """The experts of one MoE layer as ``E`` :class:`Expert` modules of linear layers, named
    ``0`` ... ``E-1`` like a ``ModuleList`` (beside the activation and the optional post-expert norm).

    Forward: ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``, the
    contract of transformers' experts modules.
    """

    def __init__(self, experts: list[Expert], gate_fn, has_gate: bool, attributes: dict,
                 act_fn: nn.Module | None, post_expert_norm: nn.Module | None = None):
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.__dict__.update(attributes)  # the fused module's settings (_apply_gate reads e.g. alpha, limit)
        self._gate_fn = gate_fn  # the experts class's own _apply_gate, a plain function
        self.has_gate = has_gate
        self.num_experts = len(experts)
        self.act_fn = act_fn
        self.post_expert_norm = post_expert_norm
        self.calibrate_all = False

    @classmethod
    def from_fused(cls, fused: nn.Module) -> ExpertLinears:
        """Unfuse ``fused`` (its weights are copied; on the meta device only the structure is built)."""
        has_gate, transposed, has_bias = fused.has_gate, fused.is_transposed, getattr(fused, "has_bias", False)
        first_name = "gate_up_proj" if has_gate else "up_proj"
        first, down = getattr(fused, first_name), fused.down_proj
        first_bias = getattr(fused, first_name + "_bias", None) if has_bias else None
        down_bias = getattr(fused, "down_proj_bias", None) if has_bias else None
        experts = [
            Expert(first_name,
                   _linear(first[e].detach(), None if first_bias is None else first_bias[e].detach(), transposed),
                   _linear(down[e].detach(), None if down_bias is None else down_bias[e].detach(), transposed))
            for e in range(first.shape[0])
        ]
        attributes = {k: v for k, v in vars(fused).items()
                      if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module))}
        gate_fn = getattr(type(fused), "_apply_gate", None)
        return cls(experts, gate_fn, has_gate, attributes, getattr(fused, "act_fn", None),
                   getattr(fused, "post_expert_norm", None) if getattr(fused, "has_post_expert_norm", False) else None)

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> Expert:
        return self._modules[str(index)]

    def __iter__(self):
        return (self._modules[str(e)] for e in range(self.num_experts))

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self._gate_fn is not None:
            return self._gate_fn(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def expert_forward(self, expert: Expert, x: torch.Tensor) -> torch.Tensor:
        h = expert.first(x)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        out = expert.down_proj(h)
        return self.post_expert_norm(out) if self.post_expert_norm is not None else out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        index = args[0] if args else next(kwargs[n] for n in _INDEX_NAMES if n in kwargs)
        weights = args[1] if len(args) > 1 else next(kwargs[n] for n in _WEIGHT_NAMES if n in kwargs)
        out = torch.zeros_like(hidden_states)
        if self.calibrate_all:
            experts = range(self.num_experts)
        else:
            with torch.no_grad():
                experts = torch.unique(index[(index >= 0) & (index < self.num_experts)]).tolist()
        for e in experts:
            token, slot = torch.where(index == e)
            if self.calibrate_all:  # every token through the expert; only the routed ones count
                y = self.expert_forward(self[e], hidden_states)[token]
            elif token.numel() == 0:
                continue
            else:
                y = self.expert_forward(self[e], hidden_states[token])
            y = y * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, has_gate={self.has_gate}"


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace fused experts modules (all, or those in ``names``) by :class:`ExpertLinears`; returns
    the names replaced."""
    fused = find_fused_experts(model)
    done = []
    for name, module in fused.items():
        if names is not None and name not in names:
            continue
        model.set_submodule(name, ExpertLinears.from_fused(module))
        done.append(name)
    return done
