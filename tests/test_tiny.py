"""Tiny random models of transformers' causal-LM types (hfcompress.testing.tiny)."""

from __future__ import annotations

import pytest
import torch

from hfcompress.testing import (
    causal_lm_types,
    layer_coverage,
    probe,
    tiny_config,
    tiny_inputs,
    tiny_model,
)


def test_causal_lm_types_lists_every_registered_type():
    types = causal_lm_types()
    assert len(types) >= 190
    assert types == sorted(set(types))
    assert {"llama", "qwen3", "mixtral", "jamba"} <= set(types)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "mixtral", "gpt_oss", "jamba", "bamba"])
def test_tiny_model_builds_and_runs(model_type):
    model = tiny_model(model_type)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    with torch.no_grad():
        logits = model(**tiny_inputs(model, batch=2, seq_len=24)).logits
    assert logits.shape == (2, 24, 512)
    assert torch.isfinite(logits).all()


def test_same_seed_same_weights():
    a, b = tiny_model("qwen3", seed=3), tiny_model("qwen3", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_widths_heads_and_vocab_shrink():
    # Mistral's default groups 32 query heads over 8 key/value heads (GQA): 4 over 2 when tiny.
    mistral = tiny_config("mistral")
    assert (mistral.hidden_size, mistral.num_attention_heads, mistral.num_key_value_heads) == (64, 4, 2)
    config = tiny_config("qwen3")
    assert config.head_dim == 16 and config.intermediate_size == 128
    assert config.num_hidden_layers == 2 and config.vocab_size == 512
    assert config.max_position_embeddings >= 256
    # GPT-2's bos/eos id (50256) is remapped into the 512-token vocabulary.
    assert tiny_config("gpt2").eos_token_id == 511


def test_moe_shrinks_to_four_experts_top_two():
    config = tiny_config("mixtral")
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)


def test_overrides_are_applied_last():
    config = tiny_config("llama", num_hidden_layers=3, hidden_size=32)
    assert (config.num_hidden_layers, config.hidden_size) == (3, 32)


def test_multimodal_token_ids_stay_distinct_inside_the_vocabulary():
    config = tiny_config("gemma3")
    ids = [config.image_token_id, config.boi_token_id, config.eoi_token_id]
    vocab = config.text_config.vocab_size
    assert all(0 <= i < vocab for i in ids) and len(set(ids)) == 3


def test_inputs_avoid_special_token_ids():
    model = tiny_model("gemma3")
    input_ids = tiny_inputs(model, batch=4, seq_len=64)["input_ids"]
    assert not torch.isin(input_ids, torch.tensor([model.config.image_token_id, model.config.boi_token_id])).any()


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_oss"])
def test_every_attention_type_appears(model_type):
    layer_types = tiny_config(model_type).layer_types
    assert {"sliding_attention", "full_attention"} <= set(layer_types)
    assert layer_coverage(model_type)["missing"] == 0


def test_hybrid_has_mamba_and_attention_and_dense_and_moe_layers():
    model = tiny_model("jamba")
    layers = [type(layer).__name__ for layer in model.model.layers]
    mlps = [type(layer.feed_forward).__name__ for layer in model.model.layers]
    assert "JambaAttentionDecoderLayer" in layers and "JambaMambaDecoderLayer" in layers
    assert "JambaSparseMoeBlock" in mlps and "JambaMLP" in mlps
    assert layer_coverage("jamba", model)["missing"] == 0


def test_bamba_gets_an_attention_layer_its_default_lacks():
    assert set(tiny_config("bamba").layers_block_type) == {"linear_attention", "full_attention"}


def test_dense_first_moe_keeps_a_moe_layer():
    model = tiny_model("deepseek_v3")
    mlps = {type(layer.mlp).__name__ for layer in model.model.layers}
    assert mlps == {"DeepseekV3MLP", "DeepseekV3MoE"}


def test_probe_reports_success():
    result = probe("llama")
    assert result["ok"] and result["error"] is None
    assert result["class"] == "LlamaForCausalLM" and result["params"] > 0
    assert set(result) == {"type", "class", "ok", "error", "params", "seconds"}
