"""AWQ: the scale search, folds that keep the float function, and AWQ before rounding or GPTQ."""

import copy

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.quantization.awq import search_scales
from hfcompress.quantization.awq_runner import apply_awq_scales, scale_groups
from hfcompress.quantization.grid import fake_quantize
from hfcompress.quantization.rtn import quantize_rtn
from hfcompress.recipe import QuantizeStage, RecipeError

DATA = torch.randint(0, 300, (16, 64), generator=torch.Generator().manual_seed(0))


def _outlier_llama():
    """Norm scales away from one and two input channels 20x larger in every norm: the activation
    outliers AWQ is for."""
    model = tiny_llama(tie=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                if "layers" in name:
                    module.weight[[3, 50]] *= 20
    return model


def _logits(model, ids=DATA[:4]):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _error(model, reference):
    return float((_logits(model) - reference).pow(2).mean())


@pytest.mark.parametrize("bits, group_size, sym", [(4, 32, True), (3, 64, False), (4, -1, True)])
def test_fake_quantize_rounds_like_rtn(bits, group_size, sym):
    W = torch.randn(40, 100)  # 100 columns: a short last group
    expected = quantize_rtn(W, bits, group_size, sym, torch.float32).dequantize()
    assert torch.equal(fake_quantize(W, bits, group_size, sym), expected)


def test_scale_search_never_loses_to_plain_rounding_on_its_sample():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        x = torch.randn(128, 48, generator=g) * (torch.rand(48, generator=g) * 5 + 0.1)
        W = torch.randn(24, 48, generator=g)
        s = search_scales(x, W, lambda w: fake_quantize(w, 3, 16, True))
        error = lambda Wq: float((x @ Wq.T - x @ W.T).pow(2).mean())  # noqa: E731
        assert error(fake_quantize(W * s, 3, 16, True) / s) <= error(fake_quantize(W, 3, 16, True)) + 1e-9


def test_groups_fold_where_the_function_allows():
    model = tiny_llama(num_key_value_heads=6)  # no grouped-query sharing: values feed the output projection 1:1
    sources = {group.source.removeprefix("model.layers.0.") for group in scale_groups(model)[0]}
    assert sources == {"input_layernorm", "post_attention_layernorm", "self_attn.v_proj", "mlp.up_proj"}
    gqa = {group.source.removeprefix("model.layers.0.") for group in scale_groups(tiny_llama())[0]}
    assert "self_attn.v_proj" not in gqa  # a value channel feeds several query heads' columns


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_folded_scales_keep_the_float_function(kind):
    from hfcompress.testing.tiny import tiny_model

    model = _outlier_llama() if kind == "llama" else tiny_model("gemma").float().eval()
    ids = DATA % model.config.vocab_size
    before = _logits(model, ids[:4])
    norm = copy.deepcopy(model.model.layers[0].input_layernorm.weight)
    apply_awq_scales(model, QuantizeStage(method="awq", bits=3, group_size=32), ids)
    assert torch.allclose(_logits(model, ids[:4]), before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)  # the scales went somewhere


def test_awq_beats_rounding_and_helps_gptq(tmp_path):
    model = _outlier_llama()
    reference = _logits(model)

    def quantized(options):
        stage = {"quantize": {"bits": 3, "group_size": 32, **options}}
        return hfcompress.compress(copy.deepcopy(model), {"stages": [stage]}, calibration_data=DATA)

    errors = {name: _error(quantized(options), reference) for name, options in (
        ("rtn", {"method": "rtn"}), ("awq", {"method": "awq"}),
        ("gptq", {"method": "gptq"}), ("gptq+awq", {"method": "gptq", "awq": True}))}
    assert errors["awq"] < errors["rtn"] / 2, errors
    assert errors["gptq+awq"] < errors["gptq"] * 0.8, errors
    awq = quantized({"method": "awq"})
    awq.save_pretrained(tmp_path)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), _logits(awq))


def test_recipe_refuses_awq_where_it_does_not_apply():
    with pytest.raises(RecipeError, match="awq: true applies to method gptq"):
        QuantizeStage.from_dict({"method": "rtn", "awq": True})
    with pytest.raises(RecipeError, match="valid: rtn, gptq, awq"):
        QuantizeStage.from_dict({"method": "awq2"})
