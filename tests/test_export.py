"""Exports: compressed-tensors read back by transformers + compressed-tensors, GPTQ v1 layout,
and clear refusals of what a format cannot hold."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.cli import main
from hfcompress.errors import UserError
from hfcompress.export import ExportError, export_model
from hfcompress.quantization import dispatch
from hfcompress.quantization.pack import pack_columns, unpack_columns

from conftest import tiny_llama

WINDOWS = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(0))


def saved(tmp_path, name="native", hidden=128, **quantize):
    model = tiny_llama(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2)
    stage = {"method": "gptq", "bits": 4, "group_size": 64, "sym": True, **quantize}
    hfcompress.compress(model, {"stages": [{"quantize": stage}]}, calibration_data=WINDOWS)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_compressed_tensors_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model, folder = saved(tmp_path, act_order=True, static_groups=True)
    out = export_model(folder, "compressed-tensors", tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    reader = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad(), dispatch.use("reference"):  # the reader dequantizes, then multiplies: so do we
        assert torch.equal(reader(WINDOWS[:2]).logits, model(WINDOWS[:2]).logits)


def test_compressed_tensors_asymmetric_layout_matches_the_library(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model, folder = saved(tmp_path, sym=False)
    out = export_model(folder, "compressed-tensors", tmp_path / "ct")
    tensors = load_file(out / "model.safetensors")
    layer = model.model.layers[0].mlp.down_proj
    codes = layer.unpack()
    name = "model.layers.0.mlp.down_proj"
    n, k = layer.out_features, layer.in_features
    assert tensors[f"{name}.weight_shape"].tolist() == [n, k]
    q = unpack_from_int32(tensors[f"{name}.weight_packed"], 4, torch.Size([n, k]))  # signed, offset by 8
    assert torch.equal(q.int() + 8, codes.q)
    zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], 4, torch.Size([n, k // 64]), packed_dim=0)
    assert torch.equal(zp.int() + 8, codes.zeros.t())
    assert torch.equal(tensors[f"{name}.weight_scale"], codes.scales.float().t())


def test_gptq_v1_layout(tmp_path):
    model, folder = saved(tmp_path, act_order=True)
    out = export_model(folder, "gptq", tmp_path / "gptq")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {**config, "quant_method": "gptq", "checkpoint_format": "gptq", "bits": 4, "group_size": 64,
                      "desc_act": True, "sym": True, "lm_head": False}
    tensors = load_file(out / "model.safetensors")
    layer = model.model.layers[1].self_attn.q_proj
    name = "model.layers.1.self_attn.q_proj"
    assert torch.equal(tensors[f"{name}.qweight"], layer.qweight)
    assert torch.equal(unpack_columns(tensors[f"{name}.qzeros"], 4, layer.out_features) + 1,
                       unpack_columns(layer.qzeros, 4, layer.out_features))  # zero minus one
    assert torch.equal(tensors[f"{name}.g_idx"], layer.g_idx)
    assert tensors[f"{name}.scales"].dtype == torch.float16
    plain = export_model(saved(tmp_path, "plain")[1], "gptq", tmp_path / "gptq-plain")
    g_idx = load_file(plain / "model.safetensors")["model.layers.0.mlp.up_proj.g_idx"]
    assert torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 64)  # always present in v1


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_ragged_groups_are_refused(tmp_path, fmt):
    _, folder = saved(tmp_path, hidden=96)  # 96 = 64 + a short group of 32
    with pytest.raises(ExportError, match="not a multiple of group_size 64"):
        export_model(folder, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_what_a_format_cannot_hold_is_refused(tmp_path):
    _, folder = saved(tmp_path, act_order=True)
    with pytest.raises(ExportError, match="static_groups"):
        export_model(folder, "compressed-tensors", tmp_path / "ct")
    model, _ = saved(tmp_path, "asym", sym=False)
    layer = model.model.layers[0].mlp.up_proj
    zeros = unpack_columns(layer.qzeros, 4, layer.out_features)
    zeros[0, 0] = 0  # a group whose weights are all >= 0 has zero point 0
    layer.qzeros.copy_(pack_columns(zeros, 4))
    model.save_pretrained(tmp_path / "asym0")
    with pytest.raises(ExportError, match="zero point of 0 cannot be stored in GPTQ v1"):
        export_model(tmp_path / "asym0", "gptq", tmp_path / "g")
    with pytest.raises(UserError, match="not saved by hfcompress"):
        tiny_llama().save_pretrained(tmp_path / "plain-float")
        export_model(tmp_path / "plain-float", "gptq", tmp_path / "g2")


def test_cli_export(tmp_path, capsys):
    _, folder = saved(tmp_path)
    assert main(["export", str(folder), "--format", "gptq", "--output", str(tmp_path / "g")]) == 0
    assert main(["export", str(folder), "--format", "gptq", "--output", str(tmp_path / "g")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    _, ragged = saved(tmp_path, "ragged", hidden=96)
    assert main(["export", str(ragged), "--format", "compressed-tensors", "--output", str(tmp_path / "c")]) == 2
    assert "short last group" in capsys.readouterr().err


def _tiny_saved(tmp_path, family, **quantize):
    from hfcompress.testing import tiny_inputs, tiny_model

    model = tiny_model(family, **({} if family == "gemma3" else {"hidden_size": 128}))
    ids = tiny_inputs(model, batch=4, seq_len=32)["input_ids"]
    stage = {"method": "gptq", "bits": 4, "group_size": 32, "sym": True, **quantize}
    hfcompress.compress(model, {"stages": [{"quantize": stage}]}, calibration_data=ids)
    model.save_pretrained(tmp_path / family)
    return model, tmp_path / family, ids[:2]


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3", "mixtral", "qwen3_moe"])
def test_new_families_export_to_compressed_tensors_that_transformers_reads(tmp_path, family):
    model, folder, ids = _tiny_saved(tmp_path, family)
    reader = AutoModelForCausalLM.from_pretrained(export_model(folder, "compressed-tensors", tmp_path / "ct"))
    with torch.no_grad(), dispatch.use("reference"):
        assert torch.equal(reader(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family, gate, up, down", [("mixtral", "w1", "w3", "w2"),
                                                     ("qwen3_moe", "gate_proj", "up_proj", "down_proj")])
def test_experts_export_under_the_hub_per_expert_names(tmp_path, family, gate, up, down):
    model, folder, _ = _tiny_saved(tmp_path, family)
    stack = "block_sparse_moe" if family == "mixtral" else "mlp"
    for fmt in ("gptq", "compressed-tensors"):
        tensors = load_file(export_model(folder, fmt, tmp_path / fmt) / "model.safetensors")
        assert not any("gate_up_proj" in k for k in tensors)
        assert all(f"model.layers.1.{stack}.experts.3.{leaf}.{'qweight' if fmt == 'gptq' else 'weight_packed'}"
                   in tensors for leaf in (gate, up, down))
    expert = model.model.layers[0].mlp.experts[2].gate_up_proj  # rows: gate, then up
    half = expert.out_features // 2
    codes = expert.unpack()
    exported = load_file(tmp_path / "gptq" / "model.safetensors")
    for leaf, rows in ((gate, slice(0, half)), (up, slice(half, None))):
        name = f"model.layers.0.{stack}.experts.2.{leaf}"
        assert torch.equal(unpack_columns(exported[f"{name}.qweight"].t().contiguous(), 4, expert.in_features),
                           codes.q[rows])  # qweight packs along K: unpack columns of its transpose
        assert torch.equal(unpack_columns(exported[f"{name}.qzeros"], 4, half) + 1, codes.zeros[:, rows])
        assert torch.equal(exported[f"{name}.scales"], codes.scales[:, rows])


def test_formats_without_a_place_for_it_refuse_fused_experts_and_quantized_embeddings(tmp_path):
    _, folder, _ = _tiny_saved(tmp_path, "gpt_oss")
    with pytest.raises(ExportError, match="one fused tensor"):
        export_model(folder, "compressed-tensors", tmp_path / "ct")
    _, folder, _ = _tiny_saved(tmp_path, "qwen3", embeddings={"bits": 4, "group_size": 32})
    with pytest.raises(ExportError, match="embedding"):
        export_model(folder, "gptq", tmp_path / "gptq")
    assert not (tmp_path / "gptq").exists()
