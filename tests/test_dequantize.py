"""Back to float: model.dequantize(), the logical parameter count, scales through dtype casts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

import hfcompress
from hfcompress.quantization.packed_tensor import PackedTensor, pack_parameter, unpack_parameter
from hfcompress.quantization.qlinear import LinearFormat

IDS = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
RTN = {"method": "rtn", "bits": 4, "group_size": 32}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("make, float_type", [(tiny_llama, nn.Linear), (tiny_gpt2, Conv1D)])
def test_dequantize_gives_the_float_model_of_the_dequantized_weights(tmp_path, make, float_type):
    model = make().eval()
    floats = model.num_parameters()
    quantize = {**RTN, "embeddings": {"bits": 8, "group_size": 32}}  # the tied table is packed too
    hfcompress.compress(model, {"stages": [{"quantize": quantize}]})
    assert model.num_parameters() == floats  # packed layers count what they stand for
    assert model.num_parameters(exclude_embeddings=True) < floats
    packed = logits(model)
    model.dequantize()
    assert torch.equal(logits(model), packed)
    assert getattr(model.config, "quantization_config", None) is None and hfcompress.compression_record(model) is None
    assert not any(type(m).__name__ in ("QuantLinear", "QuantEmbedding") for m in model.modules())
    assert any(type(m) is float_type for m in model.modules())  # the family's own linear type
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied again
    assert model.num_parameters() == floats
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), packed)


def test_a_model_still_sharing_layers_keeps_its_record_after_dequantize(tmp_path):
    model = tiny_llama(num_hidden_layers=4).eval()
    hfcompress.compress(model, {"stages": [{"share": {"every": 2, "parts": ["mlp"]}}, {"quantize": RTN}]})
    packed = logits(model)
    model.dequantize()
    record = model.config.quantization_config
    assert record.modules == {} and record.shared.modules  # the float model still shares layers
    layers = model.model.layers
    assert type(layers[0].mlp.up_proj) is nn.Linear and layers[1].mlp.up_proj is layers[0].mlp.up_proj
    assert torch.equal(logits(model), packed)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path)), packed)


def test_a_packed_raw_weight_unpacks_into_its_parameter_and_class():
    owner = nn.Module()
    owner.experts = nn.Parameter(torch.randn(3, 8, 64))
    original_class = type(owner)
    packed = pack_parameter(owner, "experts", LinearFormat(4, 32, True))
    assert isinstance(owner.experts_packed, PackedTensor) and type(owner) is not original_class
    expected = packed.tensor()
    unpack_parameter(owner, "experts")
    assert type(owner) is original_class and isinstance(owner.experts, nn.Parameter)
    assert torch.equal(owner.experts, expected) and not hasattr(owner, "experts_packed")


def test_scales_keep_their_dtype_through_model_casts_save_and_reload(tmp_path):
    model = tiny_llama()
    hfcompress.compress(model, {"stages": [{"quantize": RTN}]})
    scales = model.model.layers[0].mlp.up_proj.scales.clone()
    model.to(torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)  # not rounded to bf16
    assert model.model.norm.weight.dtype == torch.bfloat16  # the rest follows the cast
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.scales, scales)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
