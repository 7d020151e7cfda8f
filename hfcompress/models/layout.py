"""What a decoder block holds: attention heads, FFN channels and norms, found by module names.

Structured pruning and cross-layer sharing need to know which linear layer plays which role.
transformers' families name their projections from a small vocabulary (``q_proj``, ``query``,
``c_attn``, ``query_key_value``, ``o_proj``, ``dense``, ...), so roles are read off the names
inside the block's attention module, and checked against the shapes:

- attention: separate ``q``/``k``/``v`` projections, or one fused projection whose rows are
  ``[q | k | v]`` (``concat``: Phi-3, GPT-2, MPT, GPTBigCode, multi-query Falcon), one
  ``[q k v]`` triple per head (``per_head``: GPT-NeoX, Bloom, Persimmon) or one
  ``[q ... q k v]`` run per key/value group (``per_group``: Falcon's new decoder). The row order
  of a fused projection cannot be seen from its shape; :data:`FUSED_QKV_ORDER` names it for the
  families that are not ``concat``. Norms inside attention are per head (nothing to cut),
  across heads (OLMo 2's ``q_norm [H*hd]``: sliced with the heads) or one module per head
  (StableLM: kept per head); 1-D parameters of one value per query head (gpt-oss's attention
  sinks) are sliced with the heads.
- MLP: the block's other linear layers; those reading the hidden size produce the channels
  (``gate``/``up``, ``fc1``, ``c_fc``, ``intermediate.dense``; a fused ``[gate | up]`` of twice
  the width, Phi-3's ``gate_up_proj``) and the one writing it reads them (``down``, ``fc2``).

:func:`block_layout` returns None for a block it cannot read (multi-head latent attention,
Mamba mixers, experts), and callers refuse with the reason.

>>> from transformers import Phi3Config, Phi3ForCausalLM
>>> model = Phi3ForCausalLM(Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=50, pad_token_id=0))
>>> layout = block_layout(model, model.model.layers[0])
>>> layout.attention.qkv, layout.attention.qkv_order, layout.mlp.fused, layout.mlp.out
('self_attn.qkv_proj', 'concat', ('mlp.gate_up_proj',), 'mlp.down_proj')
>>> layout.sizes(model.model.layers[0])
LayerSizes(heads=4, kv_heads=2, ffn=96)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .blocks import ArchitectureError, decoder_blocks, model_type
from .experts import ExpertLinears, is_fused_experts
from .linear import is_linear_like, linear_shape

# Last name components of the projections, by role.
Q_NAMES = {"q_proj", "query", "q", "wq", "q_lin", "query_proj"}
K_NAMES = {"k_proj", "key", "k", "wk", "k_lin", "key_proj"}
V_NAMES = {"v_proj", "value", "v", "wv", "v_lin", "value_proj"}
QKV_NAMES = {"qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv", "W_pack", "wqkv", "qkv_lin"}
OUT_NAMES = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin", "proj", "o_lin"}
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")

# Row order of a fused q/k/v projection, for the families where it is not [q | k | v]. A value is
# the order, or a function of the config that returns it.
FUSED_QKV_ORDER: dict[str, str | Callable] = {
    "gpt_neox": "per_head",
    "gpt_neox_japanese": "per_head",
    "bloom": "per_head",
    "persimmon": "per_head",
    "falcon": lambda config: ("per_group" if config.new_decoder_architecture
                              else "concat" if config.multi_query else "per_head"),
    "codegen": "unsupported",  # rows interleaved over model-parallel shards
}

# Families whose heads cannot be cut without changing what the others compute, and why.
HEADS_FIXED: dict[str, str] = {
    "bloom": "its ALiBi slopes are computed from the number of heads",
    "mpt": "its ALiBi slopes are computed from the number of heads",
}


@dataclass(frozen=True)
class LayerSizes:
    """What one block keeps: query heads, key/value heads, FFN channels."""

    heads: int
    kv_heads: int
    ffn: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AttentionLayout:
    """Paths (relative to the block) of one attention module's parts."""

    module: str
    out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_order: str = "concat"
    head_norms: tuple[tuple[str, str], ...] = ()  # (path, "q" | "k"): norms across heads, sliced with them
    head_lists: tuple[tuple[str, str], ...] = ()  # (path, "q" | "k"): ModuleLists of one norm per head
    head_params: tuple[str, ...] = ()  # 1-D parameters of one value per query head (attention sinks)

    @property
    def projections(self) -> tuple[str, ...]:
        inputs = (self.qkv,) if self.qkv else (self.q, self.k, self.v)
        return (*inputs, self.out)


@dataclass(frozen=True)
class MLPLayout:
    inputs: tuple[str, ...]  # one row per channel
    fused: tuple[str, ...]  # [gate | up]: channel c is rows c and F + c
    out: str  # one column per channel

    @property
    def projections(self) -> tuple[str, ...]:
        return (*self.inputs, *self.fused, self.out)


@dataclass(frozen=True)
class BlockLayout:
    attention: AttentionLayout | None
    mlp: MLPLayout | None
    head_dim: int
    norms: tuple[str, ...]  # normalizations over the hidden size

    def sizes(self, block: nn.Module) -> LayerSizes:
        att, hd = self.attention, self.head_dim
        heads = linear_shape(block.get_submodule(att.out))[0] // hd
        if att.qkv:
            total = linear_shape(block.get_submodule(att.qkv))[1] // hd
            kv_heads = heads if att.qkv_order == "per_head" else (total - heads) // 2
        else:
            kv_heads = linear_shape(block.get_submodule(att.k))[1] // hd
        ffn = linear_shape(block.get_submodule(self.mlp.out))[0] if self.mlp else 0
        return LayerSizes(heads, kv_heads, ffn)


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _head_dim(attention: nn.Module, config) -> int | None:
    """The head size the attention module computes with (its own attribute, or one of its parts')."""
    for module in attention.modules():
        for attr in ("head_dim", "head_size", "attention_head_size", "head_size_per_head"):
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    value = getattr(config, "head_dim", None)
    return value if isinstance(value, int) and value > 0 else None


def _attention_module(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The outermost submodule of ``block`` whose class is an attention and which holds linear layers."""
    for name, module in block.named_modules():
        if not name:
            continue
        cls = type(module).__name__.lower()
        if ("attention" in cls or "attn" in cls) and any(is_linear_like(m) for m in module.modules()):
            return name, module
    return None


def _is_expertish(name: str, module: nn.Module) -> bool:
    return isinstance(module, ExpertLinears) or is_fused_experts(module) or "expert" in _last(name)


def _read_attention(model: nn.Module, block: nn.Module, hidden: int) -> tuple[AttentionLayout, int] | None:
    found = _attention_module(block)
    if found is None:
        return None
    path, attention = found
    linears = {f"{path}.{n}": m for n, m in attention.named_modules() if is_linear_like(m)}
    by_role: dict[str, list[str]] = {"q": [], "k": [], "v": [], "qkv": [], "out": []}
    for name in linears:
        for role, names in (("q", Q_NAMES), ("k", K_NAMES), ("v", V_NAMES), ("qkv", QKV_NAMES), ("out", OUT_NAMES)):
            if _last(name) in names:
                by_role[role].append(name)
    # BERT-style attention keeps its output projection under attention.output: prefer the one that
    # writes the hidden size.
    outs = [n for n in by_role["out"] if linear_shape(linears[n])[1] == hidden]
    if len(outs) != 1:
        return None
    separate = all(len(by_role[r]) == 1 for r in "qkv") and not by_role["qkv"]
    fused = len(by_role["qkv"]) == 1 and not any(by_role[r] for r in "qkv")
    if not (separate or fused) or len(linears) != (2 if fused else 4):
        return None  # multi-head latent attention, extra projections: not a layout we can cut
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hd = _head_dim(attention, text_config)
    out_in = linear_shape(linears[outs[0]])[0]
    if hd is None:
        heads = getattr(text_config, "num_attention_heads", None)
        hd = out_in // heads if heads else None
    if not hd or out_in % hd:
        return None
    heads = out_in // hd
    order = "concat"
    if fused:
        order = FUSED_QKV_ORDER.get(model_type(model), "concat")
        order = order(text_config) if callable(order) else order
        if order == "unsupported":
            return None
    else:
        q_out = linear_shape(linears[by_role["q"][0]])[1]
        k_out = linear_shape(linears[by_role["k"][0]])[1]
        if q_out != out_in or k_out % hd or linear_shape(linears[by_role["v"][0]])[1] != k_out:
            return None
    kv_heads = heads
    if fused:
        total = linear_shape(linears[by_role["qkv"][0]])[1]
        if total % hd:
            return None
        kv_heads = heads if order == "per_head" else (total // hd - heads) // 2
    else:
        kv_heads = linear_shape(linears[by_role["k"][0]])[1] // hd
    head_norms, head_lists, head_params = [], [], []
    for name, module in attention.named_modules():
        full = f"{path}.{name}" if name else path
        # Only norms named for the queries or keys (q_norm, k_layernorm ...) are per-head state: BERT
        # keeps its hidden-size output LayerNorm inside the attention module too.
        parts = name.split(".")
        kind = "k" if any(p.startswith(("k_", "key")) for p in parts) else "q" if any(
            p.startswith(("q_", "query")) for p in parts) else None
        if kind is None:
            continue
        if isinstance(module, nn.ModuleList) and len(module) == (heads if kind == "q" else kv_heads):
            head_lists.append((full, kind))
            continue
        weight = getattr(module, "weight", None)
        if (is_linear_like(module) or not isinstance(weight, nn.Parameter) or weight.dim() != 1
                or any(full.startswith(f"{p}.") for p, _ in head_lists)):
            continue
        if weight.numel() == (heads if kind == "q" else kv_heads) * hd and weight.numel() != hd:
            head_norms.append((full, kind))
    for name, param in attention.named_parameters(recurse=False):
        if param.dim() == 1 and param.numel() == heads:
            head_params.append(f"{path}.{name}")
    layout = AttentionLayout(
        module=path, out=outs[0],
        q=None if fused else by_role["q"][0], k=None if fused else by_role["k"][0],
        v=None if fused else by_role["v"][0], qkv=by_role["qkv"][0] if fused else None, qkv_order=order,
        head_norms=tuple(head_norms), head_lists=tuple(head_lists), head_params=tuple(head_params),
    )
    return layout, hd


def _read_mlp(block: nn.Module, attention_path: str, hidden: int) -> MLPLayout | None:
    linears = {}
    for name, module in block.named_modules():
        if name == attention_path or name.startswith(attention_path + "."):
            continue
        if _is_expertish(name, module):
            return None  # a MoE layer: its FFN is experts (pruned with experts:, not ffn:)
        if is_linear_like(module):
            linears[name] = module
    outs = [n for n, m in linears.items() if linear_shape(m)[1] == hidden and linear_shape(m)[0] != hidden]
    if len(outs) != 1:
        return None
    ffn = linear_shape(linears[outs[0]])[0]
    inputs, fused = [], []
    for name, module in linears.items():
        if name == outs[0]:
            continue
        in_features, out_features = linear_shape(module)
        if in_features != hidden:
            return None
        if out_features == ffn:
            inputs.append(name)
        elif out_features == 2 * ffn:
            fused.append(name)
        else:
            return None
    if not inputs and not fused:
        return None
    return MLPLayout(tuple(inputs), tuple(fused), outs[0])


def hidden_size(model: nn.Module) -> int:
    embed = model.get_input_embeddings()
    return int(embed.weight.shape[1])


def block_layout(model: nn.Module, block: nn.Module) -> BlockLayout | None:
    """The roles of ``block``'s linear layers, or None when it is not an attention + MLP block."""
    hidden = hidden_size(model)
    read = _read_attention(model, block, hidden)
    if read is None:
        return None
    attention, hd = read
    mlp = _read_mlp(block, attention.module, hidden)
    norms = tuple(name for name, module in block.named_modules()
                  if not is_linear_like(module) and not name.startswith(attention.module + ".")
                  and isinstance(getattr(module, "weight", None), nn.Parameter)
                  and module.weight.dim() == 1 and module.weight.numel() == hidden)
    return BlockLayout(attention, mlp, hd, norms)


def head_rows(layout: AttentionLayout, sizes: LayerSizes, hd: int, heads, kv_heads) -> torch.Tensor:
    """Rows of the fused q/k/v projection that belong to query ``heads`` and key/value ``kv_heads``."""
    heads = torch.as_tensor(sorted(heads), dtype=torch.long)
    kv = torch.as_tensor(sorted(kv_heads), dtype=torch.long)
    span = torch.arange(hd)
    H, KV = sizes.heads, sizes.kv_heads
    if layout.qkv_order == "per_head":  # [h: q k v] per head; key/value heads are the query heads
        return (heads[:, None] * 3 * hd + torch.arange(3 * hd)).flatten()
    if layout.qkv_order == "per_group":  # [g: q ... q k v] per key/value group
        rep = H // KV
        width = (rep + 2) * hd
        q = (heads // rep * width + heads % rep * hd)[:, None] + span
        k = (kv * width + rep * hd)[:, None] + span
        v = (kv * width + (rep + 1) * hd)[:, None] + span
        return torch.sort(torch.cat([q.flatten(), k.flatten(), v.flatten()])).values
    q = (heads[:, None] * hd + span).flatten()
    k = (H * hd + kv[:, None] * hd + span).flatten()
    v = ((H + KV) * hd + kv[:, None] * hd + span).flatten()
    return torch.cat([q, k, v])


def head_channels(heads, hd: int) -> torch.Tensor:
    """Feature indices of ``heads`` when each head owns ``hd`` consecutive features."""
    heads = torch.as_tensor(sorted(heads), dtype=torch.long)
    return (heads[:, None] * hd + torch.arange(hd)).flatten()


def common_layout(model: nn.Module, mlp: bool = True) -> BlockLayout:
    """The one :class:`BlockLayout` of every decoder block of ``model``; an :class:`ArchitectureError`
    naming the first block that is not an attention (+ dense MLP, with ``mlp``) block like the others."""
    blocks = decoder_blocks(model)
    layouts = [block_layout(model, block) for block in blocks]
    if not mlp:
        layouts = [BlockLayout(l.attention, None, l.head_dim, l.norms) if l is not None else None for l in layouts]
    kind = model_type(model)
    for i, layout in enumerate(layouts):
        if layout is None or (mlp and layout.mlp is None):
            what = ("an attention module with separate or fused q/k/v and one output projection" if layout is None
                    else "a dense MLP (a MoE layer's experts are pruned with experts:)")
            raise ArchitectureError(
                f"every decoder layer must hold {what}; layer {i} of {kind!r} ({type(blocks[i]).__name__}) does not "
                "(multi-head latent attention, Mamba or other mixers, experts)"
            )
    if len(set(layouts)) != 1:
        raise ArchitectureError(f"the decoder layers of {kind!r} differ in structure")
    return layouts[0]
