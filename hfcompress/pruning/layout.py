"""Cutting heads and FFN channels out of a block, by the roles the model registry reads.

Pruning never leaves masks behind: it slices the weights of the linear layers (and the per-head
norms and parameters that go with them) and updates the attention module's attributes that its
forward pass reads. Per block:

- attention: the query, key and value projections produce one ``head_dim`` slice per head (a
  fused projection in its own row order, see :mod:`hfcompress.models.layout`); the output
  projection reads one slice per query head along its inputs;
- grouped-query attention: query head ``h`` attends with key/value head ``h // (H / KV)``, the
  layout transformers' ``repeat_kv`` expects;
- FFN: the input projections produce one row per channel (a fused ``[gate | up]`` two), the
  output projection reads one column per channel.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
>>> layout = layout_of(model)
>>> block = model.model.layers[0]
>>> layout.sizes(block)
LayerSizes(heads=4, kv_heads=2, ffn=96)
>>> layout.keep_heads(block, [0, 1], [0])
>>> layout.keep_ffn(block, list(range(48)))
>>> layout.sizes(block), tuple(block.self_attn.q_proj.weight.shape)
(LayerSizes(heads=2, kv_heads=1, ffn=48), (32, 64))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..models import ArchitectureError, keep_inputs, keep_outputs, linear_shape, model_type, resize_linear
from ..models.layout import BlockLayout, LayerSizes, common_layout, head_channels, head_rows

__all__ = ["LayerSizes", "PruningError", "PruningLayout", "layout_of"]

# Attention-module attributes that hold sizes a forward pass reads, and what each counts.
HEAD_COUNT_ATTRS = {
    "num_heads": "heads", "num_attention_heads": "heads", "n_head": "heads", "n_heads": "heads",
    "num_key_value_heads": "kv_heads", "num_kv_heads": "kv_heads", "n_kv_heads": "kv_heads",
    "num_key_value_groups": "groups", "all_head_size": "width", "split_size": "width", "kv_dim": "kv_width",
}
# Attention attributes that hold the query width only in some families (elsewhere the same name is
# the hidden size, which must not change).
QUERY_WIDTH_ATTRS: dict[str, tuple[str, ...]] = {"gpt_bigcode": ("embed_dim",)}


class PruningError(UserError, ValueError):
    """A pruning request that cannot be carried out (sizes, GQA split, unsupported structure)."""


def _slice_vector(module: nn.Module, name: str, index: torch.Tensor) -> None:
    param = getattr(module, name, None)
    if isinstance(param, nn.Parameter):
        setattr(module, name, nn.Parameter(param.detach()[index.to(param.device)].contiguous(),
                                           requires_grad=param.requires_grad))


def _resize_vector(module: nn.Module, name: str, size: int) -> None:
    param = getattr(module, name, None)
    if isinstance(param, nn.Parameter):
        setattr(module, name, nn.Parameter(torch.empty(size, dtype=param.dtype, device=param.device),
                                           requires_grad=param.requires_grad))


class LayerConfig:
    """A model config as one layer sees it: the model's, live, with this layer's head counts."""

    def __init__(self, base, counts: dict[str, int]):
        self.__dict__["base"] = base
        self.__dict__["counts"] = counts

    def __getattr__(self, name):
        counts = self.__dict__["counts"]
        return counts[name] if name in counts else getattr(self.__dict__["base"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["base"], name, value)


@dataclass(frozen=True)
class PruningLayout:
    """The layout every block of one model shares, with the operations that cut it."""

    block: BlockLayout
    model_type: str

    @property
    def attention(self):
        return self.block.attention

    @property
    def mlp(self):
        return self.block.mlp

    def head_dim(self, block: nn.Module | None = None) -> int:
        return self.block.head_dim

    def sizes(self, block: nn.Module) -> LayerSizes:
        return self.block.sizes(block)

    def attention_linears(self) -> tuple[str, ...]:
        return self.attention.projections

    def mlp_linears(self) -> tuple[str, ...]:
        return self.mlp.projections if self.mlp else ()

    # pruning -------------------------------------------------------------------------------
    def keep_heads(self, block: nn.Module, heads: list[int], kv_heads: list[int]) -> None:
        """Keep query heads ``heads`` and key/value heads ``kv_heads`` (original numbering)."""
        att, hd = self.attention, self.block.head_dim
        sizes = self.sizes(block)
        q_index, kv_index = head_channels(heads, hd), head_channels(kv_heads, hd)
        if att.qkv:
            keep_outputs(block.get_submodule(att.qkv), head_rows(att, sizes, hd, heads, kv_heads))
        else:
            keep_outputs(block.get_submodule(att.q), q_index)
            keep_outputs(block.get_submodule(att.k), kv_index)
            keep_outputs(block.get_submodule(att.v), kv_index)
        keep_inputs(block.get_submodule(att.out), q_index)
        for path, kind in att.head_norms:
            norm = block.get_submodule(path)
            for name in ("weight", "bias"):
                _slice_vector(norm, name, q_index if kind == "q" else kv_index)
        for path, kind in att.head_lists:
            keep = sorted(heads if kind == "q" else kv_heads)
            old = block.get_submodule(path)
            block.set_submodule(path, nn.ModuleList([old[i] for i in keep]))
        for path in att.head_params:
            module_path, _, name = path.rpartition(".")
            _slice_vector(block.get_submodule(module_path), name, torch.as_tensor(sorted(heads)))
        self.set_head_counts(block, len(heads), len(kv_heads))

    def set_head_counts(self, block: nn.Module, heads: int, kv_heads: int) -> None:
        """Update the attention module's attributes that its forward pass reads (a per-head norm
        list's owner counts its own list)."""
        attention = block.get_submodule(self.attention.module)
        lists = {path.rpartition(".")[0]: kind for path, kind in self.attention.head_lists}
        values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads if kv_heads else 1,
                  "width": heads * self.block.head_dim, "kv_width": kv_heads * self.block.head_dim}
        for attr in QUERY_WIDTH_ATTRS.get(self.model_type, ()):
            setattr(attention, attr, values["width"])
        config = getattr(attention, "config", None)
        if config is not None:
            # Some attention modules read the head count from the config at run time (Phi-3 splits
            # its fused projection there): a layer reads its own counts through a view of the config.
            base = config.base if isinstance(config, LayerConfig) else config
            counts = {"num_attention_heads": heads}
            counts.update({k: kv_heads for k in ("num_key_value_heads", "num_kv_heads")
                           if isinstance(getattr(base, k, None), int)})
            same = all(getattr(base, k, None) == v for k, v in counts.items())
            attention.config = base if same else LayerConfig(base, counts)
        for name, module in attention.named_modules():
            full = f"{self.attention.module}.{name}" if name else self.attention.module
            if full in lists:
                if isinstance(getattr(module, "num_heads", None), int):
                    module.num_heads = heads if lists[full] == "q" else kv_heads
                continue
            for attr, what in HEAD_COUNT_ATTRS.items():
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(module, attr, values[what])

    def keep_ffn(self, block: nn.Module, channels: list[int]) -> None:
        index = torch.as_tensor(sorted(channels), dtype=torch.long)
        width = self.sizes(block).ffn
        for path in self.mlp.inputs:
            keep_outputs(block.get_submodule(path), index)
        for path in self.mlp.fused:
            keep_outputs(block.get_submodule(path), torch.cat([index, width + index]))
        keep_inputs(block.get_submodule(self.mlp.out), index)

    # reload --------------------------------------------------------------------------------
    def reshape(self, block: nn.Module, sizes: LayerSizes, head_dim: int) -> None:
        """Give ``block`` empty layers of ``sizes`` (before a checkpoint's weights load into it)."""

        def resize(path: str, in_features: int | None = None, out_features: int | None = None) -> None:
            module = block.get_submodule(path)
            old_in, old_out = linear_shape(module)
            block.set_submodule(path, resize_linear(module, in_features or old_in, out_features or old_out))

        att = self.attention
        q_width, kv_width = sizes.heads * head_dim, sizes.kv_heads * head_dim
        if att.qkv:
            resize(att.qkv, out_features=q_width + 2 * kv_width)
        else:
            resize(att.q, out_features=q_width)
            resize(att.k, out_features=kv_width)
            resize(att.v, out_features=kv_width)
        resize(att.out, in_features=q_width)
        for path, kind in att.head_norms:
            for name in ("weight", "bias"):
                _resize_vector(block.get_submodule(path), name, q_width if kind == "q" else kv_width)
        for path, kind in att.head_lists:
            keep = sizes.heads if kind == "q" else sizes.kv_heads
            block.set_submodule(path, nn.ModuleList(list(block.get_submodule(path))[:keep]))
        for path in att.head_params:
            module_path, _, name = path.rpartition(".")
            _resize_vector(block.get_submodule(module_path), name, sizes.heads)
        if self.mlp:
            for path in self.mlp.inputs:
                resize(path, out_features=sizes.ffn)
            for path in self.mlp.fused:
                resize(path, out_features=2 * sizes.ffn)
            resize(self.mlp.out, in_features=sizes.ffn)
        self.set_head_counts(block, sizes.heads, sizes.kv_heads)


def layout_of(model: nn.Module, mlp: bool = True) -> PruningLayout:
    """The one :class:`PruningLayout` of every block of ``model``; a clear error when the blocks
    are not attention (+ dense MLP, with ``mlp``) blocks of one shape."""
    try:
        layout = common_layout(model, mlp=mlp)
    except ArchitectureError as err:
        raise PruningError(f"structured pruning: {err}; prune layers: only, or quantize instead") from None
    return PruningLayout(layout, model_type(model))
