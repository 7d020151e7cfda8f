"""transformers integration: compression=, quantization_config=, save and bit-identical reload."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import hfcompress
from hfcompress import CompressionConfig, QuantLinear
from hfcompress.errors import CheckpointError

from conftest import W4G64, tiny_gpt2, tiny_llama


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(1, 300, (2, 19), generator=torch.Generator().manual_seed(0))


def test_compression_kwarg_quantizes_while_loading(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=W4G64)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.k_proj, QuantLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
    assert not isinstance(model.lm_head, QuantLinear)  # lm_head is left alone unless asked
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    error = (logits(model, IDS) - logits(reference, IDS)).abs().max()
    assert 0 < error < 1.0  # quantized, and still close
    assert model.config.quantization_config.recipe == hfcompress.Recipe.load(W4G64)


def test_quantization_config_object_works_too(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=CompressionConfig(recipe=W4G64))
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)


def test_compression_and_quantization_config_together_is_an_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="either compression= or quantization_config="):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=W4G64,
                                             quantization_config=CompressionConfig(recipe=W4G64))


def write_tiny_gguf(path, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=300):
    """A tiny random Llama as a float32 GGUF file (no tokenizer: the model loads without one)."""
    import numpy as np
    from gguf import GGUFWriter

    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.ffn_norm": (hidden,),
                       f"blk.{i}.attn_q": (hidden, hidden), f"blk.{i}.attn_k": (kv, hidden),
                       f"blk.{i}.attn_v": (kv, hidden), f"blk.{i}.attn_output": (hidden, hidden),
                       f"blk.{i}.ffn_gate": (ffn, hidden), f"blk.{i}.ffn_up": (ffn, hidden),
                       f"blk.{i}.ffn_down": (hidden, ffn)})
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.05
        writer.add_tensor(f"{name}.weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_quantization_config_on_a_gguf_file_loads_then_compresses(tmp_path):
    # transformers refuses a quantizer on a GGUF file; the plugin loads it in float, then compresses.
    write_tiny_gguf(tmp_path / "tiny.gguf")
    config = CompressionConfig(recipe=W4G64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", quantization_config=config)
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    assert model.config.quantization_config.recipe == hfcompress.Recipe.load(W4G64)
    same = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", compression=W4G64)
    assert torch.equal(logits(model, IDS), logits(same, IDS))
    with pytest.raises(ValueError, match="either compression= or quantization_config="):
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", compression=W4G64,
                                             quantization_config=CompressionConfig(recipe=W4G64))


def test_bad_recipe_fails_before_loading(tiny_llama_dir):
    with pytest.raises(hfcompress.RecipeError, match="bits: 6"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression={"stages": [{"quantize": {"bits": 6}}]})


@pytest.mark.parametrize("recipe", [
    W4G64,
    {"stages": [{"quantize": {"bits": 3, "group_size": 32, "sym": False}}]},
    {"stages": [{"quantize": {"bits": 8, "group_size": -1}}]},
    {"stages": [{"quantize": {"bits": 2, "group_size": 64, "sym": False, "ignore": ["mlp.down_proj"]}}]},
])
def test_save_and_reload_llama_is_bit_identical(tmp_path, tiny_llama_dir, recipe):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=recipe)
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "out", save_format="native")  # the native layout (test_save_format: the rest)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["recipe"] == hfcompress.Recipe.load(recipe).to_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata()["hfcompress_format_version"] == "1"
        assert "model.layers.0.mlp.up_proj.qweight" in f.keys()
        assert not any(k.endswith("up_proj.weight") for k in f.keys())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.model.layers[0].mlp.up_proj, QuantLinear)
    assert torch.equal(logits(reloaded, IDS), expected)
    ignored = recipe["stages"][0]["quantize"].get("ignore")
    if ignored:
        assert not isinstance(reloaded.model.layers[0].mlp.down_proj, QuantLinear)


def test_saving_twice_gives_the_same_bytes(tmp_path, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=W4G64)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b and b'{"__metadata__":{"format":"pt","hfcompress_format_version":"1"}' in a[:80]


def test_reload_with_dtype_and_device_map(tmp_path, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=W4G64, dtype=torch.bfloat16)
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16, device_map="cpu")
    qlinear = reloaded.model.layers[0].self_attn.q_proj
    assert qlinear.scales.dtype == torch.float16 and reloaded.dtype == torch.bfloat16
    assert torch.equal(logits(reloaded, IDS), expected)


def test_bert_encoder_through_automodel(tmp_path, tiny_bert_dir):
    model = AutoModel.from_pretrained(tiny_bert_dir, compression=W4G64)
    assert isinstance(model.encoder.layer[0].attention.self.query, QuantLinear)
    assert model.encoder.layer[0].attention.self.query.bias is not None
    ids = IDS[:, :16]
    expected = model(ids).last_hidden_state
    model.save_pretrained(tmp_path / "bert")
    reloaded = AutoModel.from_pretrained(tmp_path / "bert")
    assert torch.equal(reloaded(ids).last_hidden_state, expected)


def test_gpt2_conv1d_layers(tmp_path, tiny_gpt2_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, compression={"stages": [{"quantize": {"bits": 8, "group_size": -1}}]})
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)
    assert (logits(model, IDS) - logits(reference, IDS)).abs().max() < 0.05  # 8-bit: nearly lossless
    model.save_pretrained(tmp_path / "gpt2")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2"), IDS), logits(model, IDS))


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_is_quantized_when_asked(tmp_path, tie):
    model = hfcompress.compress(tiny_llama(tie=tie), {"stages": [{"quantize": {"bits": 8, "lm_head": True}}]})
    assert isinstance(model.lm_head, QuantLinear)
    assert not isinstance(model.model.embed_tokens.weight, QuantLinear)
    assert model.config.tie_word_embeddings is False
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(reloaded.lm_head, QuantLinear)
    assert torch.equal(logits(reloaded, IDS), expected)


def test_compress_on_a_model_in_memory(tmp_path):
    model = hfcompress.compress(tiny_llama(), "w4-rtn")
    model.save_pretrained(tmp_path / "m")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), IDS), logits(model, IDS))


def test_compressing_twice_is_refused(tmp_path, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=W4G64)
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="already compressed"):
        hfcompress.compress(reloaded, W4G64)


def _saved(tmp_path, tiny_llama_dir):
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=W4G64).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_llama_dir):
    folder = _saved(tmp_path, tiny_llama_dir)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors file"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_checkpoint_missing_packed_tensors_is_a_clear_error(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path, tiny_llama_dir)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing model.layers.1.mlp.up_proj.scales"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_edited_config_is_a_clear_error(tmp_path, tiny_llama_dir):
    folder = _saved(tmp_path, tiny_llama_dir)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quantized"][0]["bits"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantized\[0\].bits: expected 2, 3, 4 or 8, got 5"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_plain_models_are_untouched_by_the_plugin(tmp_path, tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
