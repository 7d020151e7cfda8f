"""Tiny random models for every causal-LM model type that transformers registers.

Each type's default configuration (usually a 7B-class model) is shrunk by generic rules:
widths to about 64, 4 attention heads (2 key/value heads where the config has grouped-query
attention), a vocabulary of 512, 4 experts with top-2 routing, small MLA ranks and state sizes,
and as few decoder layers as still show every layer type of the default layer pattern (sliding
and full attention, mamba and attention, dense and MoE MLPs). Sub-configs (``text_config``,
``vision_config``, ...) shrink the same way. A short table, :data:`OVERRIDES`, fixes the types
that the generic rules get wrong.

>>> from hfcompress.testing import tiny_inputs, tiny_model
>>> model = tiny_model("llama")
>>> inputs = tiny_inputs(model, batch=2, seq_len=8)
>>> model(**inputs).logits.shape
torch.Size([2, 8, 512])
>>> model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads
(2, 64, 4)
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = [
    "OVERRIDES",
    "causal_lm_types",
    "decoder_depth",
    "describe_error",
    "layer_coverage",
    "layer_signatures",
    "probe",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
]

VOCAB = 512
HEADS = 4
KV_HEADS = 2
LAYERS = 2
MAX_POSITIONS = 512

_EXPERT_COUNT_KEYS = ["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"]
_TOP_K_KEYS = ["num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_top_k", "moe_topk", "top_k_experts"]
_SHARED_EXPERT_KEYS = ["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"]

# Generic size rules: a config key found here is capped at the value given (never grown: a
# default that is already smaller stays). They apply to every (sub-)config alike.
_CAPS: dict[str, int] = {
    # model width
    **dict.fromkeys(
        ["hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "embedding_size", "embedding_dim",
         "word_embed_proj_dim", "lru_width", "hidden_size_global", "backbone_hidden_size",
         "input_embedding_size", "output_embedding_size", "projector_input_dim", "projector_output_dim",
         "out_hidden_size", "vision_output_dim", "cross_attention_hidden_size", "router_hidden_size",
         "adapter_in_dim", "adapter_out_dim", "adapter_input_size", "output_channels", "ext_pw_out_channel",
         "depthwise_separable_out_channel", "nemo_conv_channels", "pronunciation_embed_dim", "shape_embed_dim",
         "ple_embed_dim"],
        64,
    ),
    # attention heads (key/value heads follow them, see _KV_HEAD_KEYS)
    **dict.fromkeys(
        ["num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "encoder_attention_heads",
         "decoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
         "conf_num_attention_heads", "swa_num_attention_heads", "index_n_heads", "indexer_n_heads",
         "linear_num_heads", "linear_num_value_heads", "num_attention_heads_per_layer"],
        HEADS,
    ),
    # per-head widths
    **dict.fromkeys(
        ["head_dim", "attention_head_dim", "d_head", "dim_head", "kv_channels", "attention_head_size",
         "swa_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim", "linear_head_dim",
         "linear_key_head_dim", "linear_value_head_dim", "index_head_dim", "indexer_head_dim",
         "qk_nope_head_dim", "v_head_dim", "qk_head_dim", "d_rel"],
        16,
    ),
    "qk_rope_head_dim": 8,
    "rotary_dim": 8,  # partial rotary (GPT-J, CodeGen): a part of the 16-wide heads
    "hidden_size_per_layer_input": 16,  # Gemma 3n/4 per-layer input embeddings
    # feed-forward widths
    **dict.fromkeys(
        ["intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "dim_ff", "dff",
         "ffn_hidden_size", "feed_forward_size", "intermediate_size_mlp", "dense_intermediate_size",
         "prefix_dense_intermediate_size", "mlp_dim", "d_inner"],
        128,
    ),
    **dict.fromkeys(
        ["moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
         "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size", "shared_intermediate_size"],
        32,
    ),
    # mixture of experts: 4 experts, top-2, one shared expert, one expert group
    **dict.fromkeys(_EXPERT_COUNT_KEYS, 4),
    **dict.fromkeys(_TOP_K_KEYS, 2),
    **dict.fromkeys(_SHARED_EXPERT_KEYS, 1),
    **dict.fromkeys(["n_group", "num_expert_group", "topk_group"], 1),
    "zero_expert_num": 2,  # LongCat's identity ("zero") experts
    # low-rank side paths (hyper-connections, adapters, gates)
    **dict.fromkeys(["hc_lowrank", "adapter_rank", "loop_gate_rank"], 16),
    # multi-head latent attention (DeepSeek-style) and sparse-attention indexers
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "o_lora_rank": 16,
    **dict.fromkeys(["index_topk", "indexer_budget"], 8),
    # state-space / recurrent / convolution states
    **dict.fromkeys(["ssm_state_size", "state_size", "mamba_d_state"], 16),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], 8),
    **dict.fromkeys(["time_step_rank", "mamba_dt_rank"], 8),
    "mamba_d_ssm": 128,  # = SSM heads x head width (8 x 16)
    **dict.fromkeys(["n_groups", "mamba_n_groups", "mamba_ngroups"], 1),
    **dict.fromkeys(["chunk_size", "mamba_chunk_size"], 16),
    # local attention windows: shorter than the test sequences, so that they actually bite
    **dict.fromkeys(
        ["sliding_window", "sliding_window_size", "attention_window_size", "attention_chunk_size",
         "local_attention_window_len", "window_size"],
        16,
    ),
    # positions (only defaults above MAX_POSITIONS drop, so at least 256 stay where there were)
    **dict.fromkeys(
        ["max_position_embeddings", "n_positions", "n_ctx", "max_source_positions", "max_target_positions",
         "max_seq_len", "context_length"],
        MAX_POSITIONS,
    ),
}

# Key/value-head counts and the head count each one is grouped against.
_KV_HEAD_KEYS = {
    "num_key_value_heads": "num_attention_heads",
    "num_kv_heads": "num_attention_heads",
    "kv_n_heads": "n_heads",
    "swa_num_key_value_heads": "swa_num_attention_heads",
    "num_query_groups": "num_attention_heads",
    "indexer_kv_heads": "indexer_n_heads",
    "linear_num_key_heads": "linear_num_value_heads",  # gated delta net: value heads share key heads
}

# Keys that count decoder layers; the first one a config has is the one its per-layer lists follow.
_LAYER_KEYS = ["num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers"]
# Other depth keys (encoders, side stacks) just drop to LAYERS.
_OTHER_DEPTH_KEYS = ["encoder_layers", "num_encoder_layers", "conf_num_hidden_layers", "num_blocks"]

# Token ids that must stay inside the shrunk vocabulary.
_TOKEN_KEY = re.compile(r"(token_ids?|token_index|^mask_index|^unk_index)$")
_TOKEN_LIST_KEYS = {"suppress_tokens", "begin_suppress_tokens"}
# Lists of layer indices (rather than one entry per layer).
_INDEX_LIST_KEY = re.compile(r"(idxs|indices|indexes|_ids|_layers)$")

# Layer patterns given by a period or a count instead of a per-layer list: for each key, whether
# layer ``i`` is of the "special" kind. They make the layer selection a prefix of the default
# pattern, since the model recomputes the pattern from these numbers.
_PERIODIC: dict[str, Any] = {
    "first_k_dense_replace": lambda c, i: i >= c["first_k_dense_replace"],
    "num_dense_layers": lambda c, i: i >= c["num_dense_layers"],
    "attn_layer_period": lambda c, i: i % c["attn_layer_period"] == c.get("attn_layer_offset", 0),
    "expert_layer_period": lambda c, i: i % c["expert_layer_period"] == c.get("expert_layer_offset", 0),
    "decoder_sparse_step": lambda c, i: (i + 1) % c["decoder_sparse_step"] == 0,
    "interleave_moe_layer_step": lambda c, i: (i + 1) % c["interleave_moe_layer_step"] == 0,
    "moe_layer_interval": lambda c, i: (
        (i + 1) % c["moe_layer_interval"] == 0
        and i >= (c.get("moe_layer_start_index") or 0)
        and (c.get("moe_layer_end_index") in (None, -1) or i <= c["moe_layer_end_index"])
    ),
    "sliding_window_pattern": lambda c, i: (i + 1) % c["sliding_window_pattern"] == 0,
    "_sliding_window_pattern": lambda c, i: (i + 1) % c["_sliding_window_pattern"] == 0,
    "global_attn_every_n_layers": lambda c, i: i % c["global_attn_every_n_layers"] == 0,
    "no_rope_layer_interval": lambda c, i: (i + 1) % c["no_rope_layer_interval"] == 0,
    "n_layers_per_attn_res_block": lambda c, i: i % c["n_layers_per_attn_res_block"] == 0,
}
# A prefix longer than this falls back to picking layers out of the per-layer lists.
_MAX_PREFIX = 12

_QSA = {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 4}
_ASSISTANT_TEXT = {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}

# Per-type fixes where the generic rules fail, merged over their result (a nested dict updates
# that sub-config). Each says why.
OVERRIDES: dict[str, dict] = {
    # The default hybrids below have no attention (or no mamba/conv) layer at all: add one so
    # that both kinds of layer appear.
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2": {"full_attn_idxs": [1], "layer_types": ["conv", "full_attention"]},
    # Default leaves layer_types unset (None) and the model indexes it: conv + attention, dense + MoE.
    "lfm2_moe": {"num_hidden_layers": 2, "num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    # block_types cycles recurrent, recurrent, attention: three layers show both kinds.
    "recurrent_gemma": {"num_hidden_layers": 3},
    # Hybrid layers tie their shared transformer to the first one: two are needed to tie.
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # Dory serialises layer_types interleaved with "mlp" blocks and doubled counts; give the
    # plain form, with one layer each before, in and after the recurrent section.
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
             "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    # attention_layers is expanded from attention_types ([[pattern, repeats]]), not read.
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # Looped layers are a range of whole attention-residual blocks: three blocks of three layers
    # (sliding, sliding, full) give layers before, in and after the loop, at and off block starts.
    "inkling2_loop_text": {
        "num_hidden_layers": 9, "n_layers_per_attn_res_block": 3, "loop_layer_index_start": 3,
        "loop_layer_index_end": 6, "layer_types": ["hybrid_sliding", "hybrid_sliding", "hybrid"] * 3,
    },
    # The config rounds the q/k width (hidden x qk_dim_factor 0.5) up to a multiple of 64, the layers do not.
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # SSM heads x head_dim must equal expand x hidden_size (2 x 64).
    "mamba2": {"num_heads": 8},
    # The LM head requires a decoder; axial position shapes must multiply to the positions and
    # their widths add up to the hidden size.
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [16, 48]},
    # Default rope_parameters is empty but the model reads one entry per layer type.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # Default attn_config has no rope_theta and no clip_qkv, which the attention reads.
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # Default has indexed-attention layers but leaves the indexer (QSA) sizes unset.
    "qwen4_exp": {"text_config": _QSA},
    "qwen4_exp_text": _QSA,
    # Assistants (drafters) must not have per-layer input embeddings (the default fails validation).
    "gemma4_assistant": {"text_config": _ASSISTANT_TEXT},
    "gemma4_unified_assistant": {"text_config": _ASSISTANT_TEXT},
}


def causal_lm_types() -> list[str]:
    """Every model type registered for ``AutoModelForCausalLM``, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# --------------------------------------------------------------------------------------------
# Shrinking a configuration
# --------------------------------------------------------------------------------------------


def _default_config(model_type: str) -> PreTrainedConfig:
    """The type's default config; where that fails its own validation, with the type's override."""
    config_class = CONFIG_MAPPING[model_type]
    try:
        return config_class()
    except (StrictDataclassError, ValueError):
        if model_type not in OVERRIDES:
            raise
        return config_class(**_without_depth(OVERRIDES[model_type]))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cap(key: str, value):
    """The generic capped value of one (key, value), or ``value`` itself."""
    cap = _CAPS.get(key)
    if cap is None:
        return value
    if _is_int(value) and value > cap:
        return cap
    if isinstance(value, list) and value and all(_is_int(v) for v in value):
        return [min(v, cap) for v in value]
    return value


def _shrink_widths(node: dict) -> dict:
    """The changed keys of one config dict under the width/head/expert rules (not depth)."""
    changes = {}
    for key, value in node.items():
        new = _cap(key, value)
        if new != value:
            changes[key] = new
    for key, value in node.items():
        # Every vocabulary (the main one, per-layer inputs, hashed n-grams, audio codes, ...).
        if "vocab" in key and key != "vocab_offset" and _is_int(value) and value > VOCAB:
            changes[key] = VOCAB
    new = {**node, **changes}
    # Some defaults leave these to the checkpoint (None) although the model needs them.
    hidden, heads = new.get("hidden_size"), new.get("num_attention_heads")
    if "head_dim" in node and node["head_dim"] is None and _is_int(hidden) and _is_int(heads):
        changes["head_dim"] = hidden // heads
    if "num_key_value_heads" in node and node["num_key_value_heads"] is None and _is_int(heads):
        changes["num_key_value_heads"] = heads
    is_moe = any(_is_int(new.get(k)) for k in _EXPERT_COUNT_KEYS) or _is_int(new.get("moe_intermediate_size"))
    if is_moe:
        for key in _EXPERT_COUNT_KEYS + _TOP_K_KEYS + _SHARED_EXPERT_KEYS:
            if key in node and node[key] is None:
                changes[key] = _CAPS[key]
    # Key/value heads keep the default's grouping: equal to the heads (MHA), one (MQA), or 2 (GQA).
    for kv_key, heads_key in _KV_HEAD_KEYS.items():
        kv, heads = node.get(kv_key), node.get(heads_key)
        if not (_is_int(kv) and _is_int(heads)):
            continue
        new_heads = changes.get(heads_key, heads)
        new_kv = new_heads if kv == heads else 1 if kv == 1 else min(KV_HEADS, new_heads)
        if new_kv != kv:
            changes[kv_key] = new_kv
    # Multi-head latent attention: the query/key head is its two parts side by side, and
    # `head_dim`, where it equals the rotary part, is the rotary embedding's width.
    if _is_int(node.get("qk_nope_head_dim")) and _is_int(node.get("qk_rope_head_dim")):
        rope = changes.get("qk_rope_head_dim", node["qk_rope_head_dim"])
        if _is_int(node.get("qk_head_dim")):
            changes["qk_head_dim"] = changes.get("qk_nope_head_dim", node["qk_nope_head_dim"]) + rope
        if node.get("head_dim") == node["qk_rope_head_dim"]:
            changes["head_dim"] = rope
    for key in _OTHER_DEPTH_KEYS:
        if _is_int(node.get(key)) and node[key] > LAYERS:
            changes[key] = LAYERS
    if isinstance(node.get("per_layer_config"), dict):
        changes["per_layer_config"] = _shrink_per_layer_config(node, changes)
    return changes


def _shrink_per_layer_config(node: dict, changes: dict) -> dict:
    """Shrink a heterogeneous config's per-layer overrides (``{layer: {key: value}}``) alike.

    An override that the caps would make equal to the global value (say head_dim 512 against
    256, both capped to 16) becomes twice (or half) the global one instead, so that the tiny
    model keeps its heterogeneous layers.
    """
    out = {}
    for layer, override in node["per_layer_config"].items():
        shrunk = _shrink_widths({**node, **override, "per_layer_config": None})
        layer_changes = {}
        for key, value in override.items():
            new = shrunk.get(key, value)
            glob_old, glob_new = node.get(key), changes.get(key, node.get(key))
            if _is_int(new) and _is_int(glob_old) and value != glob_old and new == glob_new:
                new = glob_new * 2 if value > glob_old else max(1, glob_new // 2)
            layer_changes[key] = new
        # Keep an MLA layer's identity head_dim = nope + rope when the override holds one part.
        old, new_view = {**node, **override}, {**node, **changes, **layer_changes}
        parts = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")
        if "qk_nope_head_dim" in override and all(_is_int(old.get(k)) for k in parts) \
                and old["head_dim"] == old["qk_nope_head_dim"] + old["qk_rope_head_dim"]:
            layer_changes["qk_nope_head_dim"] = new_view["head_dim"] - new_view["qk_rope_head_dim"]
        out[int(layer)] = layer_changes
    return out


def _layer_key(node: dict) -> str | None:
    return next((k for k in _LAYER_KEYS if _is_int(node.get(k))), None)


def _shrink_depth(node: dict) -> dict:
    """Changed keys that pick as few layers as still show every kind of layer.

    A layer's kind is its entry in every per-layer list (``layer_types``, ``mlp_layer_types``,
    ...), whether it is in every list of layer indices (``moe_layers``, ``full_attn_idxs``, ...),
    and what every periodic rule (``first_k_dense_replace``, ``attn_layer_period``, ...) makes of
    it. The first layer of each kind is kept; with a periodic rule the kept layers must be a
    prefix of the default stack, since the model recomputes the pattern from the rule.
    """
    key = _layer_key(node)
    if key is None:
        return {}
    depth = node[key]
    per_layer = {
        k: v for k, v in node.items()
        if isinstance(v, list) and len(v) == depth and not _INDEX_LIST_KEY.search(k) and not _TOKEN_KEY.search(k)
    }
    index_lists = {
        k: v for k, v in node.items()
        if _INDEX_LIST_KEY.search(k) and isinstance(v, list) and v and all(_is_int(i) and 0 <= i < depth for i in v)
        and v == sorted(set(v))
    }
    periodic = {k: rule for k, rule in _PERIODIC.items() if _is_int(node.get(k)) and node[k] > 0}
    # Heterogeneous configs: {layer: {key: value}} for the layers that differ from the rest.
    per_layer_config = {int(i): v for i, v in (node.get("per_layer_config") or {}).items()}

    def kind(i: int) -> tuple:
        return (
            tuple(str(v[i]) for v in per_layer.values()),
            tuple(i in v for v in index_lists.values()),
            tuple(bool(rule(node, i)) for rule in periodic.values()),
            str(sorted(per_layer_config.get(i, {}).items())),
        )

    first: dict[tuple, int] = {}
    for i in range(depth):
        first.setdefault(kind(i), i)
    # The first layer is often built differently (no residual input, no pre-norm): keep a second
    # layer of its kind too, where there is one, so that the ordinary variant appears as well.
    again = next((i for i in range(1, depth) if kind(i) == kind(0)), None)
    keep = sorted(set(first.values()) | ({again} if again is not None else set()))
    if periodic and keep[-1] < _MAX_PREFIX:
        keep = list(range(keep[-1] + 1))
    # At least LAYERS layers, taken from the start of the stack.
    for i in range(depth):
        if len(keep) >= LAYERS:
            break
        if i not in keep:
            keep = sorted(keep + [i])

    changes: dict[str, Any] = {key: len(keep)}
    for k, v in per_layer.items():
        changes[k] = _cap(k, [v[i] for i in keep])
    for k, v in index_lists.items():
        changes[k] = [keep.index(i) for i in v if i in keep]
    if per_layer_config:
        changes["per_layer_config"] = {n: per_layer_config[i] for n, i in enumerate(keep) if i in per_layer_config}
    shared = node.get("num_kv_shared_layers")
    if _is_int(shared) and shared == depth:
        # Every layer reads the key/values of another model (Gemma 4 assistants).
        changes["num_kv_shared_layers"] = len(keep)
    elif _is_int(shared) and shared > 0:
        # Layers that share the key/value cache of earlier layers (Gemma 3n, Gemma 4) come last:
        # repeat the kept pattern so that each shared layer has a source layer of its own kind.
        n = len(keep)
        changes[key] = 2 * n
        changes["num_kv_shared_layers"] = n
        for k in per_layer:
            changes[k] = changes[k] * 2
        if per_layer_config:
            changes["per_layer_config"].update({n + j: v for j, v in changes["per_layer_config"].items()})
    return changes


def _sub_config_keys(node: dict) -> list[str]:
    return [k for k, v in node.items() if isinstance(v, dict) and "model_type" in v]


def _remap_token_ids(tree: dict, kwargs: dict) -> None:
    """Move every special token id that fell out of the shrunk vocabulary back inside it.

    Each distinct old id gets its own new id, counted down from the top of the vocabulary, so
    that ids a model tells apart (image vs. text tokens) stay distinct; ids that already fit stay.
    """
    found: list[tuple[list[str], str, Any]] = []

    def collect(node: dict, path: list[str]):
        for k, v in node.items():
            if isinstance(v, dict) and "model_type" in v:
                collect(v, path + [k])
            elif _TOKEN_KEY.search(k) or k in _TOKEN_LIST_KEYS:
                found.append((path, k, v))

    collect(tree, [])

    def own_vocab(node: dict, kw: dict) -> int | None:
        return kw.get("vocab_size", node.get("vocab_size"))

    def vocab_at(path: list[str]) -> int | None:
        node, kw = tree, kwargs
        for p in path:
            node, kw = node[p], kw.get(p, {})
        # A (sub-)config without a vocabulary names ids of the text model's, or the top level's.
        return (own_vocab(node, kw)
                or own_vocab(tree.get("text_config") or {}, kwargs.get("text_config") or {})
                or own_vocab(tree, kwargs))

    def ids(v):
        return [v] if _is_int(v) else [i for i in v if _is_int(i)] if isinstance(v, list) else []

    used = {i for path, _, v in found for i in ids(v) if (vocab_at(path) or 0) > i >= 0}
    new_ids: dict[int, int] = {}
    next_free = VOCAB - 1

    def remap(i: int, vocab: int) -> int:
        nonlocal next_free
        if i < vocab:
            return i
        if i not in new_ids:
            while next_free in used:
                next_free -= 1
            new_ids[i] = next_free
            used.add(next_free)
        return new_ids[i]

    for path, k, v in found:
        vocab = vocab_at(path)
        if vocab is None or not ids(v):
            continue
        new = remap(v, vocab) if _is_int(v) else [remap(i, vocab) if _is_int(i) else i for i in v]
        if new != v:
            target = kwargs
            for p in path:
                target = target.setdefault(p, {})
            target[k] = new


def _merge(into: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def _tiny_kwargs(model_type: str, full_depth: bool = False) -> dict:
    default = _default_config(model_type)
    tree = default.to_dict()

    def shrink(node: dict, cfg: PreTrainedConfig, top: bool) -> dict:
        # A sub-config keeps what its parent set on it (values that differ from a bare
        # instance of its class); the top-level config starts from its class defaults.
        base = {}
        if not top:
            bare = type(cfg)().to_dict()
            base = {k: v for k, v in node.items() if k not in bare or bare[k] != v}
            base = {k: v for k, v in base.items() if not (isinstance(v, dict) and "model_type" in v)}
        kwargs = dict(base)
        kwargs.update(_shrink_widths(node))
        if not full_depth:
            kwargs.update(_shrink_depth({**node, **kwargs}))
        for k in _sub_config_keys(node):
            sub = getattr(cfg, k, None)
            if isinstance(sub, PreTrainedConfig):
                kwargs[k] = shrink(node[k], sub, top=False)
                kwargs[k].setdefault("model_type", node[k]["model_type"])
        return kwargs

    kwargs = shrink(tree, default, top=True)
    _remap_token_ids(tree, kwargs)
    return kwargs


# Override keys that set the depth or the layer pattern (kept out of full-depth configs).
_DEPTH_KEY = re.compile(
    r"(^num_hidden_layers|^num_layers|_layers|layer_types|block_type|_idxs|_indices|attention_types)$"
)


def _without_depth(override: dict) -> dict:
    return {
        k: _without_depth(v) if isinstance(v, dict) else v for k, v in override.items() if not _DEPTH_KEY.search(k)
    }


def tiny_config(model_type: str, full_depth: bool = False, **overrides) -> PreTrainedConfig:
    """The default config of ``model_type``, shrunk so that its model builds and runs in well under a second.

    ``full_depth=True`` keeps the default number of layers and layer pattern (everything else
    shrinks): :func:`layer_coverage` compares the two. ``overrides`` are set last (a dict value
    updates that sub-config).
    """
    kwargs = _tiny_kwargs(model_type, full_depth=full_depth)
    override = OVERRIDES.get(model_type, {})
    _merge(kwargs, _without_depth(override) if full_depth else override)
    _merge(kwargs, overrides)
    return CONFIG_MAPPING[model_type](**kwargs)


def _build(config: PreTrainedConfig) -> nn.Module:
    """``AutoModelForCausalLM.from_config``, or, where the causal-LM class is built on one of the
    composite config's sub-configs (MusicGen's decoder), that class on that sub-config."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    wanted = getattr(model_class, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        subs = [getattr(config, k) for k in config.sub_configs if isinstance(getattr(config, k, None), wanted)]
        if subs:
            return model_class._from_config(subs[0], dtype=torch.float32)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny ``AutoModelForCausalLM`` of ``model_type``, float32, in eval mode."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return _build(config).float().eval()


# --------------------------------------------------------------------------------------------
# Inputs and probing
# --------------------------------------------------------------------------------------------


def _special_ids(config: PreTrainedConfig) -> set[int]:
    """Every token id named anywhere in the config tree (special, image, audio tokens...)."""
    out: set[int] = set()

    def visit(node: dict):
        for k, v in node.items():
            if isinstance(v, dict):
                visit(v)
            elif isinstance(k, str) and (_TOKEN_KEY.search(k) or k in _TOKEN_LIST_KEYS):
                out.update([v] if _is_int(v) else [i for i in v if _is_int(i)] if isinstance(v, list) else [])

    visit(config.to_dict())
    return out


def _codebook_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    # MusicGen decoders take one row of audio codes per codebook: (batch * num_codebooks, seq).
    return {"input_ids": input_ids.repeat_interleave(model.config.num_codebooks, dim=0)}


def _language_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    # X-MOD routes every sequence through the adapter of its language.
    return {"input_ids": input_ids, "lang_ids": torch.zeros(input_ids.shape[0], dtype=torch.long)}


def _no_cache_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    # BLT's cache is built from its top-level config, which has no layer count.
    return {"input_ids": input_ids, "use_cache": False}


def _assistant_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Gemma 4 assistants draft from the target model's states: its (concatenated embedding and
    last hidden) states and the key/values of its last layer of each attention type."""
    gen = torch.Generator().manual_seed(0)
    batch, seq = input_ids.shape
    embeds = torch.randn(batch, seq, model.pre_projection.in_features, generator=gen)
    text = model.config.get_text_config()
    shared = {}
    for layer in model.model.layers:
        attn = layer.self_attn
        kind = text.layer_types[attn.layer_idx]
        if kind not in shared:
            shape = (batch, attn.config.num_key_value_heads, seq, attn.head_dim)
            shared[kind] = (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    inputs = {"inputs_embeds": embeds, "shared_kv_states": shared}
    if model.config.model_type == "gemma4_assistant":
        # Its decoder would slice the per-layer inputs that assistants do not have (None) to the
        # kept positions; asking for the hidden states turns that shortcut off.
        inputs["output_hidden_states"] = True
    return inputs


# Per-type keyword inputs other than plain ``input_ids``: callables of (model, input_ids).
_INPUTS: dict[str, Any] = {
    "musicgen_decoder": _codebook_inputs,  # (the causal LM's config is the composite's decoder)
    "musicgen_melody_decoder": _codebook_inputs,
    "xmod": _language_inputs,
    "blt": _no_cache_inputs,
    "gemma4_assistant": _assistant_inputs,
    "gemma4_unified_assistant": _assistant_inputs,
}


def _vocab_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    return model.config.get_text_config(decoder=True).vocab_size


def tiny_inputs(model: nn.Module, batch: int = 2, seq_len: int = 32, seed: int = 0) -> dict:
    """Keyword inputs for a plain text forward pass: random ids that avoid every special token id."""
    vocab = _vocab_size(model)
    allowed = sorted(set(range(vocab)) - _special_ids(model.config))
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(allowed), (batch, seq_len), generator=gen)
    input_ids = torch.tensor(allowed)[picks]
    make = _INPUTS.get(model.config.model_type)
    return make(model, input_ids) if make is not None else {"input_ids": input_ids}


def describe_error(error: BaseException) -> str:
    """One line: the exception, plus why when an optional third-party package is missing."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Validation errors say what failed on the line after "...validator 'x':".
    head = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else ""
    text = f"{type(error).__name__}: {head}" if head else type(error).__name__
    if isinstance(error, ImportError):
        # transformers lists each missing package on a line of its own: name them all.
        needs = [line.split(" but ")[0] for line in lines if " requires " in line]
        text = f"missing optional package: ImportError: {'; '.join(needs) or head}"
    return text[:300]


def probe(model_type: str) -> dict:
    """Build the tiny model of ``model_type`` and run one forward pass; report how it went."""
    start = time.perf_counter()
    result = {"type": model_type, "class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type), "ok": False,
              "error": None, "params": 0, "seconds": 0.0}
    try:
        model = tiny_model(model_type)
        result["class"] = type(model).__name__
        result["params"] = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            model(**tiny_inputs(model))
        result["ok"] = True
    except Exception as error:  # a probe reports every failure rather than raising it
        result["error"] = describe_error(error)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


# --------------------------------------------------------------------------------------------
# Layer pattern coverage
# --------------------------------------------------------------------------------------------

# Module attributes that tell layers of one class apart (sliding vs. full attention, ...).
_KIND_ATTRS = ("is_sliding", "sliding_window", "attention_type", "layer_type", "use_rope", "is_kv_shared_layer",
               "is_moe", "is_sparse", "is_global", "is_local", "attention_chunk_size", "is_causal",
               "is_block_boundary")


def _module_kind(module: nn.Module) -> tuple:
    attrs = []
    for name in _KIND_ATTRS:
        if name in module.__dict__:
            value = module.__dict__[name]
            if _is_int(value):  # a window size: only whether there is one matters
                value = True
            if value is None or isinstance(value, (bool, str)):
                attrs.append((name, value))
    return type(module).__name__, tuple(attrs)


def layer_signatures(model: nn.Module) -> list[tuple]:
    """One signature per block of every stack of blocks (``nn.ModuleList``) in ``model``.

    A signature is the stack's path (indices dropped) and, for every module inside the block,
    its relative path (indices dropped), class name and kind attributes (see ``_KIND_ATTRS``),
    so that two blocks have equal signatures when they are the same kind of layer.
    """
    signatures = []
    stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for stack_name, stack in stacks:
        for block in stack:
            parts = set()
            for name, module in block.named_modules():
                parts.add((re.sub(r"\.\d+(?=\.|$)|^\d+(?=\.|$)", ".*", name), *_module_kind(module)))
            signatures.append((re.sub(r"\.\d+(?=\.|$)", ".*", stack_name), frozenset(parts)))
    return signatures


def decoder_depth(config: PreTrainedConfig) -> int | None:
    """The number of decoder layers of a (possibly composite) config, where it says."""
    text = config.get_text_config(decoder=True)
    for key in _LAYER_KEYS:
        if _is_int(getattr(text, key, None)):
            return getattr(text, key)
    for key in ("layer_types", "layers_block_type"):  # some configs count layers by their pattern
        if isinstance(getattr(text, key, None), (list, tuple)):
            return len(getattr(text, key))
    return None


def layer_coverage(model_type: str, model: nn.Module | None = None) -> dict:
    """Whether the tiny model has every kind of layer that the default-depth layer pattern has.

    The reference is the same tiny widths at the default depth and pattern
    (``tiny_config(..., full_depth=True)``), built on the meta device so that it costs nothing.
    Returns ``{"layers", "reference_layers"}`` (decoder layers of each) and ``"missing"``: the
    kinds of block (see :func:`layer_signatures`) that the reference has and the tiny model lacks.
    """
    if model is None:
        model = tiny_model(model_type)
    reference_config = tiny_config(model_type, full_depth=True)
    with torch.device("meta"):
        reference = _build(reference_config)
    missing = set(layer_signatures(reference)) - set(layer_signatures(model))
    return {
        "layers": decoder_depth(model.config),
        "reference_layers": decoder_depth(reference.config),
        "missing": len(missing),
    }
