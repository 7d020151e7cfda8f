"""Where each family keeps its heads and FFN channels, and how to cut them out of a block.

Pruning never leaves masks behind: it slices the weights of the linear layers and updates the
few attributes that the family's forward pass reads (head counts, split sizes). Per block:

- attention: the query, key and value projections produce one ``head_dim`` slice per head
  (GPT-2 fuses them in ``c_attn``: ``[q | k | v]`` along its outputs); the output projection
  reads one slice per query head along its inputs;
- grouped-query attention (Llama family): query head ``h`` attends with key/value head
  ``h // (heads / kv_heads)``, the layout transformers' ``repeat_kv`` expects;
- FFN: the input projections (``gate``/``up``, ``fc1``, ``c_fc``, ``intermediate.dense``) produce
  one row per channel, the output projection reads one column per channel.

Adding a family means one :class:`Family` entry with its module paths and config keys.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
>>> family = family_of(model)
>>> block = model.model.layers[0]
>>> family.sizes(block)
LayerSizes(heads=4, kv_heads=2, ffn=96)
>>> family.keep_heads(block, [0, 1], [0])
>>> family.keep_ffn(block, list(range(48)))
>>> family.sizes(block), tuple(block.self_attn.q_proj.weight.shape)
(LayerSizes(heads=2, kv_heads=1, ffn=48), (32, 64))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import UserError
from ..models import BLOCK_PATHS, linear_shape


class PruningError(UserError, ValueError):
    """A pruning request that cannot be carried out (sizes, GQA split, unsupported family)."""


@dataclass(frozen=True)
class LayerSizes:
    """What one block keeps: query heads, key/value heads, FFN channels."""

    heads: int
    kv_heads: int
    ffn: int

    def to_dict(self) -> dict:
        return asdict(self)


# --- slicing linear layers, as [out, in] whatever their storage ---------------------------------


def _parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep output features ``index`` of an ``nn.Linear`` or ``Conv1D`` (weight rows, bias entries)."""
    index = index.to(module.weight.device)
    if isinstance(module, Conv1D):
        _parameter(module, "weight", module.weight.detach()[:, index])
        module.nf = len(index)
    else:
        _parameter(module, "weight", module.weight.detach()[index])
        module.out_features = len(index)
    if module.bias is not None:
        _parameter(module, "bias", module.bias.detach()[index])


def keep_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep input features ``index`` of an ``nn.Linear`` or ``Conv1D``."""
    index = index.to(module.weight.device)
    if isinstance(module, Conv1D):
        _parameter(module, "weight", module.weight.detach()[index])
    else:
        _parameter(module, "weight", module.weight.detach()[:, index])
        module.in_features = len(index)


def resize_linear(module: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """An empty layer like ``module`` with new sizes, on the same device and dtype (for reloads)."""
    weight = module.weight
    bias = module.bias is not None
    with torch.device(weight.device):
        if isinstance(module, Conv1D):
            new = Conv1D(out_features, in_features)
            if not bias:
                new.bias = None
        else:
            new = nn.Linear(in_features, out_features, bias=bias)
    return new.to(weight.dtype)


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a float linear layer or of a packed one (a pruned model quantized later)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    return linear_shape(module)


def head_channels(heads: list[int] | torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Feature indices of ``heads`` when each head owns ``head_dim`` consecutive features."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (offset + heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


# --- families -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Module paths (relative to a block) and config keys of one model family.

    ``qkv`` is either three paths or one fused path (GPT-2's ``c_attn``). ``plain_heads``: the
    config can express a new head count by itself (Llama: ``head_dim`` is a config key; GPT-2,
    OPT and BERT derive the head size from ``hidden_size / heads``, so their pruned heads are
    recorded in our config instead). ``count_attrs``: attention-module attributes that hold
    sizes the forward pass reads.
    """

    attention: str
    qkv: tuple[str, ...]
    out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    heads_key: str
    kv_heads_key: str | None
    ffn_key: str
    plain_heads: bool
    norms: tuple[str, ...] = ()  # normalizations over the hidden size inside a block (hidden pruning)

    # sizes ---------------------------------------------------------------------------------
    def head_dim(self, block: nn.Module) -> int:
        attn = block.get_submodule(self.attention)
        for attr in ("head_dim", "attention_head_size"):
            if hasattr(attn, attr):
                return int(getattr(attn, attr))
        raise PruningError(f"{type(attn).__name__} has no head size attribute")

    def sizes(self, block: nn.Module) -> LayerSizes:
        hd = self.head_dim(block)
        out_in, _ = _shape(block.get_submodule(self.out))
        heads = out_in // hd
        if len(self.qkv) == 1:
            kv_heads = heads
        else:
            kv_heads = _shape(block.get_submodule(self.qkv[1]))[1] // hd
        ffn = _shape(block.get_submodule(self.ffn_out))[0]
        return LayerSizes(heads, kv_heads, ffn)

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        names = (*self.qkv, self.out, *self.ffn_in, self.ffn_out)
        return {name: block.get_submodule(name) for name in names}

    # pruning -------------------------------------------------------------------------------
    def keep_heads(self, block: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        """Keep query heads ``heads`` and key/value heads ``kv_heads`` (sorted, original numbering)."""
        hd = self.head_dim(block)
        sizes = self.sizes(block)
        q_index = head_channels(heads, hd)
        if len(self.qkv) == 1:  # fused [q | k | v]: the same heads in each third
            width = sizes.heads * hd
            fused = torch.cat([head_channels(heads, hd, part * width) for part in range(3)])
            keep_outputs(block.get_submodule(self.qkv[0]), fused)
        else:
            kv_index = head_channels(kv_heads, hd)
            q, k, v = (block.get_submodule(path) for path in self.qkv)
            keep_outputs(q, q_index)
            keep_outputs(k, kv_index)
            keep_outputs(v, kv_index)
        keep_inputs(block.get_submodule(self.out), q_index)
        self.set_head_counts(block, len(heads), len(kv_heads))

    def set_head_counts(self, block: nn.Module, heads: int, kv_heads: int) -> None:
        """Update the attention module's attributes that its forward pass reads."""
        attn = block.get_submodule(self.attention)
        hd = self.head_dim(block)
        updates = {
            "num_heads": heads,  # OPT, GPT-2
            "num_attention_heads": heads,  # BERT
            "all_head_size": heads * hd,  # BERT
            "split_size": heads * hd,  # GPT-2: c_attn's output splits into q, k, v of this width
            "num_key_value_groups": heads // kv_heads if kv_heads else 1,  # Llama family
        }
        for attr, value in updates.items():
            if hasattr(attn, attr):
                setattr(attn, attr, value)

    def keep_ffn(self, block: nn.Module, channels: list[int]) -> None:
        index = torch.as_tensor(channels, dtype=torch.long)
        for path in self.ffn_in:
            keep_outputs(block.get_submodule(path), index)
        keep_inputs(block.get_submodule(self.ffn_out), index)

    # reload --------------------------------------------------------------------------------
    def reshape(self, block: nn.Module, sizes: LayerSizes, head_dim: int) -> None:
        """Give ``block`` empty layers of ``sizes`` (before a checkpoint's weights load into it)."""

        def resize(path: str, in_features: int | None = None, out_features: int | None = None) -> None:
            module = block.get_submodule(path)
            old_in, old_out = linear_shape(module)
            block.set_submodule(path, resize_linear(module, in_features or old_in, out_features or old_out))

        q_width, kv_width = sizes.heads * head_dim, sizes.kv_heads * head_dim
        if len(self.qkv) == 1:
            resize(self.qkv[0], out_features=3 * q_width)
        else:
            resize(self.qkv[0], out_features=q_width)
            resize(self.qkv[1], out_features=kv_width)
            resize(self.qkv[2], out_features=kv_width)
        resize(self.out, in_features=q_width)
        for path in self.ffn_in:
            resize(path, out_features=sizes.ffn)
        resize(self.ffn_out, in_features=sizes.ffn)
        self.set_head_counts(block, sizes.heads, sizes.kv_heads)

    def config_sizes(self, config) -> LayerSizes:
        """The sizes a freshly built block of ``config`` has."""
        heads = getattr(config, self.heads_key)
        kv = getattr(config, self.kv_heads_key, None) if self.kv_heads_key else None
        ffn = getattr(config, self.ffn_key, None) or 4 * config.hidden_size  # GPT-2: n_inner None = 4 x
        return LayerSizes(heads, kv or heads, ffn)


_LLAMA = Family(
    attention="self_attn", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj",
    heads_key="num_attention_heads", kv_heads_key="num_key_value_heads", ffn_key="intermediate_size",
    plain_heads=True, norms=("input_layernorm", "post_attention_layernorm"),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Family(
        attention="attn", qkv=("attn.c_attn",), out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
        heads_key="n_head", kv_heads_key=None, ffn_key="n_inner", plain_heads=False,
    ),
    "opt": Family(
        attention="self_attn", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        out="self_attn.out_proj", ffn_in=("fc1",), ffn_out="fc2",
        heads_key="num_attention_heads", kv_heads_key=None, ffn_key="ffn_dim", plain_heads=False,
    ),
    "bert": Family(
        attention="attention.self", qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense",
        heads_key="num_attention_heads", kv_heads_key=None, ffn_key="intermediate_size", plain_heads=False,
    ),
}


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``; a clear error for a model type we cannot prune."""
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if model_type not in FAMILIES or model_type not in BLOCK_PATHS:
        raise PruningError(
            f"structured pruning does not support model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]
