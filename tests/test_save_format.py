"""What save_pretrained writes: compressed-tensors where it is exact (stock transformers loads it,
hfcompress reloads it bit for bit), the native format otherwise (stock transformers refuses it
with an error naming hfcompress)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.cli import main
from hfcompress.errors import UserError
from hfcompress.export import ExportError, export_model
from hfcompress.formats.folder import NATIVE_MARK
from hfcompress.testing.stock import run_without_hfcompress

from conftest import tiny_llama

IDS = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))

STOCK = """
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for name, folder in json.loads(sys.argv[1]).items():
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
    except Exception as err:
        out[name] = {"error": type(err).__name__, "message": str(err)}
        continue
    ids = torch.tensor(json.loads(sys.argv[2]))
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids[:1, :8], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    out[name] = {"logits": logits.tolist(), "generated": generated.shape[1]}
print(json.dumps(out))
"""


def quantized(**stage):
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    return hfcompress.compress(model, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32,
                                                                 "sym": True, **stage}}]}, calibration_data=IDS)


def reloads_bit_for_bit(model, folder):
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ours, theirs = model.state_dict(), reloaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("stage", [{}, {"bits": 8, "group_size": -1}, {"group_size": 128, "lm_head": True}],
                         ids=["w4g32", "w8-channel", "w4g128-lm_head"])
def test_default_save_is_compressed_tensors_that_stock_transformers_loads(tmp_path, stage):
    model = quantized(**stage)
    model.save_pretrained(tmp_path / "m")
    assert model.hfcompress_saved_format == "compressed-tensors"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["model_type"] == "llama" and config["hfcompress"]["storage"] == "compressed-tensors"
    reloads_bit_for_bit(model, tmp_path / "m")
    stock = run_without_hfcompress(STOCK, json.dumps({"m": str(tmp_path / "m")}), json.dumps(IDS.tolist()))["m"]
    with torch.no_grad():
        ours = model(IDS).logits
    theirs = torch.tensor(stock["logits"])
    assert (theirs - ours).abs().max() < 1e-4  # the stock reader dequantizes, then multiplies
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1)) and stock["generated"] == 11


def test_what_compressed_tensors_cannot_hold_is_saved_native_and_fails_loudly_without_hfcompress(tmp_path, caplog):
    cases = {"w3": quantized(bits=3), "act_order": quantized(act_order=True, method="gptq"),
             "ragged": hfcompress.compress(tiny_llama(), {"stages": [{"quantize": {"bits": 4, "group_size": 64}}]})}
    for name, model in cases.items():
        with caplog.at_level("INFO", logger="hfcompress"):
            model.save_pretrained(tmp_path / name)
        assert model.hfcompress_saved_format == "native"
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model_type"] == "llama" + NATIVE_MARK
        reloads_bit_for_bit(model, tmp_path / name)
    assert "3-bit" in caplog.text and "g_idx" in caplog.text and "short last group" in caplog.text
    stock = run_without_hfcompress(STOCK, json.dumps({n: str(tmp_path / n) for n in cases}), json.dumps(IDS.tolist()))
    for name in cases:
        assert stock[name]["error"] == "ValueError"
        assert "pip install hfcompress, then import hfcompress" in stock[name]["message"]


def test_save_format_choice(tmp_path):
    model = quantized()
    model.save_pretrained(tmp_path / "native", save_format="native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "hfcompress"
    reloads_bit_for_bit(model, tmp_path / "native")
    with pytest.raises(ExportError, match="3-bit"):
        quantized(bits=3).save_pretrained(tmp_path / "w3", save_format="compressed-tensors")
    with pytest.raises(UserError, match="unknown save format 'gguf'"):
        model.save_pretrained(tmp_path / "x", save_format="gguf")


def test_a_compressed_tensors_save_exports_to_gptq_and_compressed_tensors(tmp_path):
    model = quantized()
    model.save_pretrained(tmp_path / "m")
    gptq = export_model(tmp_path / "m", "gptq", tmp_path / "gptq")
    assert json.loads((gptq / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    ct = export_model(tmp_path / "m", "compressed-tensors", tmp_path / "ct")
    config = json.loads((ct / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors" and "hfcompress" not in config


def test_compressed_tensors_keeps_the_true_width_of_layers_packing_pads(tmp_path):
    """K = 100 is not a multiple of 8 values per word: weight_shape must say 100, not 104."""
    model = hfcompress.compress(tiny_llama(hidden_size=100, intermediate_size=200, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=26),
                                {"stages": [{"quantize": {"bits": 4, "group_size": -1}}]})
    model.save_pretrained(tmp_path / "native", save_format="native")
    out = export_model(tmp_path / "native", "compressed-tensors", tmp_path / "ct")
    from safetensors.torch import load_file

    assert load_file(out / "model.safetensors")["model.layers.0.mlp.gate_proj.weight_shape"].tolist() == [200, 100]
    stock = run_without_hfcompress(STOCK, json.dumps({"ct": str(out)}), json.dumps(IDS.tolist()))["ct"]
    with torch.no_grad():
        assert (torch.tensor(stock["logits"]) - model(IDS).logits).abs().max() < 1e-4
    model.save_pretrained(tmp_path / "default")
    assert model.hfcompress_saved_format == "compressed-tensors"
    reloads_bit_for_bit(model, tmp_path / "default")


def test_export_refusals_name_a_format_that_accepts_the_model(tmp_path):
    w3 = quantized(bits=3)
    w3.save_pretrained(tmp_path / "w3")
    with pytest.raises(ExportError, match="3-bit.*export to gptq instead"):
        export_model(tmp_path / "w3", "compressed-tensors", tmp_path / "x")
    embeddings = hfcompress.compress(
        tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
        {"stages": [{"quantize": {"bits": 4, "group_size": 32, "embeddings": {"bits": 4, "group_size": 32}}}]})
    embeddings.save_pretrained(tmp_path / "emb")
    assert embeddings.hfcompress_saved_format == "native"
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match="no export format holds this model"):
            export_model(tmp_path / "emb", fmt, tmp_path / "y")


def test_cli_compress_says_which_format_it_wrote(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tiny_llama_dir), "--recipe", "w8-rtn", "--output", str(out), "--no-eval"]) == 0
    assert "format:     compressed-tensors" in capsys.readouterr().out
    assert main(["compress", str(tiny_llama_dir), "--recipe", "w8-rtn", "--output", str(tmp_path / "n"),
                 "--no-eval", "--format", "native"]) == 0
    assert "format:     native" in capsys.readouterr().out
    assert json.loads((tmp_path / "n" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "hfcompress"


def test_the_default_save_format_needs_no_extra():
    """The README's first command installs no extra beyond gguf: what the default save writes with
    must come with hfcompress itself."""
    from importlib.metadata import requires

    core = [r for r in requires("hfcompress") if "extra ==" not in r]
    assert any(r.replace("_", "-").startswith("compressed-tensors") for r in core)


def test_rotated_gptaq_model_saves_compressed_tensors_that_stock_transformers_loads(tmp_path):
    """The bundled best 4-bit recipe's stages (rotation, then GPTQ with static act-order, the
    clipping search and asymmetric calibration) on a tiny Llama: a standard compressed-tensors save."""
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    model.model.norm.weight.data.uniform_(0.5, 1.5)  # a non-uniform final norm: lm_head gets its own matrix
    recipe = {"stages": [{"rotate": {}}, {"quantize": {
        "method": "gptq", "bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": True,
        "shrink": 0, "asymmetric": 0.25, "mse": True}}]}
    model = hfcompress.compress(model, recipe, calibration_data=IDS)
    model.save_pretrained(tmp_path / "m")
    assert model.hfcompress_saved_format == "compressed-tensors"
    reloads_bit_for_bit(model, tmp_path / "m")
    stock = run_without_hfcompress(STOCK, json.dumps({"m": str(tmp_path / "m")}), json.dumps(IDS.tolist()))["m"]
    with torch.no_grad():
        ours = model(IDS).logits
    assert (torch.tensor(stock["logits"]) - ours).abs().max() < 1e-4
