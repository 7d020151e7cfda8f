"""``compress --layerwise``: the model built empty, its blocks read from disk one at a time, the
output written tensor by tensor; the files must equal the in-memory run's, byte for byte."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama
from hfcompress.cli import main
from hfcompress.layerwise import DiskWeights, open_on_disk
from hfcompress.residency import resident, store_of

GPTQ = {"method": "gptq", "bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": True}
CALIBRATION = {"samples": 4, "seq_len": 32}


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _recipe(tmp_path, quantize: dict, **calibration):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"calibration": {**CALIBRATION, **calibration}, "stages": [{"quantize": quantize}]}))
    return str(path)


@pytest.fixture(scope="module")
def untied_llama_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("models") / "tiny-llama-untied"
    tiny_llama(tie=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _calibration_text(tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    return str(text)


@pytest.mark.parametrize("quantize, dtype, compute", [
    ({"method": "rtn", "bits": 4, "group_size": 32, "sym": True}, "float32", "auto"),
    (GPTQ, "float32", "auto"),
    ({**GPTQ, "asymmetric": 0.25, "mse": True}, "float32", "auto"),
    ({**GPTQ, "group_size": 48}, "bfloat16", "auto"),  # a ragged last group: the native format
    # A bfloat16 model computed in float32 (what auto picks on CPUs without bf16 instructions):
    # the weights on disk are raised as they come in, from the bfloat16 values the model holds.
    ({**GPTQ, "group_size": 48}, "bfloat16", "float32"),
    ({"method": "awq", "bits": 4, "group_size": 32, "sym": True}, "float32", "auto"),
])
@pytest.mark.parametrize("tied", [True, False])
def test_layerwise_output_equals_in_memory(tmp_path, tiny_llama_dir, untied_llama_dir, quantize, dtype, compute, tied):
    source = tiny_llama_dir if tied else untied_llama_dir
    recipe = _recipe(tmp_path, quantize, compute_dtype=compute)
    common = [str(source), "--recipe", recipe, "--no-eval", "--dtype", dtype, "--calibration-data",
              _calibration_text(tmp_path)]
    # The same output name (the model card names it) in two folders.
    assert main(["compress", *common, "--output", str(tmp_path / "memory" / "out")]) == 0
    assert main(["compress", *common, "--output", str(tmp_path / "disk" / "out"), "--layerwise"]) == 0
    memory, disk = _digests(tmp_path / "memory" / "out"), _digests(tmp_path / "disk" / "out")
    assert memory == disk
    assert list((tmp_path / "disk").iterdir()) == [tmp_path / "disk" / "out"]  # the spill folder is gone


@pytest.mark.parametrize("prune", [
    {"heads": 3, "ffn": 0.25, "hidden": 0.25, "importance": "activation"},
    {"heads": 2, "ffn": 0.5, "hidden": 0.25, "importance": "magnitude", "gqa": "per_group"},
    {"heads": 3, "ffn": 0.25, "importance": "activation", "uniform": False},  # per-layer sizes: our record
])
@pytest.mark.parametrize("tied", [True, False])
def test_layerwise_pruning_equals_in_memory(tmp_path, tiny_llama_dir, untied_llama_dir, prune, tied):
    """The importance pass walks the blocks from disk and each unit is cut while it is in memory;
    then GPTQ on the pruned shapes: the files are the in-memory run's."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"calibration": CALIBRATION, "stages": [{"prune": prune}, {"quantize": GPTQ}]}))
    common = [str(tiny_llama_dir if tied else untied_llama_dir), "--recipe", str(recipe), "--no-eval", "--dtype",
              "float32", "--calibration-data", _calibration_text(tmp_path)]
    assert main(["compress", *common, "--output", str(tmp_path / "memory" / "out")]) == 0
    assert main(["compress", *common, "--output", str(tmp_path / "disk" / "out"), "--layerwise"]) == 0
    memory, disk = _digests(tmp_path / "memory" / "out"), _digests(tmp_path / "disk" / "out")
    assert memory == disk
    config = json.loads((tmp_path / "disk" / "out" / "config.json").read_text())
    assert config["num_attention_heads"] < 6 or config["quantization_config"].get("pruned")


@pytest.mark.parametrize("prune, words", [
    ({"heads": 2, "importance": "taylor"}, "taylor"),
    ({"layers": 1}, "renumbers"),
])
def test_layerwise_refuses_whole_model_pruning(tmp_path, tiny_llama_dir, capsys, prune, words):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"stages": [{"prune": prune}]}))
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "o"),
                 "--layerwise", "--no-eval"]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_blocks_load_one_at_a_time(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = open_on_disk(tiny_llama_dir, AutoModelForCausalLM, dtype="float32", spill=tmp_path / "spill")
    store = store_of(model)
    assert isinstance(store, DiskWeights)
    assert all(p.is_meta for p in model.parameters())
    blocks = store.blocks
    with resident(model, blocks[1]):
        loaded = {name for name, p in model.named_parameters() if not p.is_meta}
        assert loaded and all(name.startswith(blocks[1] + ".") for name in loaded)
    assert all(p.is_meta for p in model.parameters())
    # A whole forward pass reads each unit as it comes and drops it again; logits match the float model.
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    assert all(p.is_meta for p in model.parameters())


def test_a_bf16_model_on_disk_evaluated_in_float32_equals_it_in_memory(tmp_path, tiny_llama_dir, monkeypatch):
    """Computing in float32 (auto, where bf16 is emulated) raises the weights from disk as they come
    in, rounded to the bfloat16 the model holds (the float32 checkpoint's own values would differ)."""
    from transformers import AutoModelForCausalLM

    from hfcompress import precision
    from hfcompress.evaluation import evaluate_perplexity

    monkeypatch.setattr(precision, "native_precision", lambda dtype, device: dtype == torch.float32)
    ids = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(1))
    memory = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    disk = open_on_disk(tiny_llama_dir, AutoModelForCausalLM, dtype="bfloat16", spill=tmp_path / "spill")
    expected = evaluate_perplexity(memory, None, ids, seq_len=64, progress=False)
    result = evaluate_perplexity(disk, None, ids, seq_len=64, progress=False)
    assert result.dtype == expected.dtype == "float32" and result.nll == expected.nll
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in disk.parameters())  # at rest as before


def test_layerwise_refuses_whole_model_stages(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"stages": [{"rotate": {}}, {"quantize": {"method": "rtn"}}]}))
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "o"),
                 "--layerwise", "--no-eval"]) == 2
    assert "needs it in memory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_layerwise_output_reloads(tmp_path, tiny_llama_dir):
    import hfcompress  # noqa: F401
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, {"method": "rtn", "bits": 4, "group_size": 32, "sym": True})
    out = tmp_path / "out"
    assert main(["compress", str(tiny_llama_dir), "--recipe", recipe, "--no-eval", "--dtype", "float32",
                 "--output", str(out), "--layerwise"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    assert any(name.endswith("weight_packed") for name in tensors)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_replaced_layers_are_dropped_with_their_block(tmp_path, tiny_llama_dir):
    """A stage's own list of the layers it replaces must not keep their float weights in memory."""
    import hfcompress
    from transformers import AutoModelForCausalLM

    model = open_on_disk(tiny_llama_dir, AutoModelForCausalLM, dtype="float32", spill=tmp_path / "spill")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    hfcompress.compress(model, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]})
    assert all(m.weight.is_meta for m in linears)  # replaced by packed layers, and dropped
    assert all(t.is_meta for t in model.state_dict().values())


def test_a_unit_left_non_finite_is_refused(tmp_path, tiny_llama_dir):
    """What the in-memory run checks after each stage, the store checks for each unit it writes back."""
    from transformers import AutoModelForCausalLM

    from hfcompress.errors import StageError

    model = open_on_disk(tiny_llama_dir, AutoModelForCausalLM, dtype="float32", spill=tmp_path / "spill")
    block = store_of(model).blocks[0]
    with pytest.raises(StageError, match="input_layernorm.weight holds non-finite values"):
        with resident(model, block):
            model.get_submodule(block).input_layernorm.weight.data[0] = float("inf")
    assert all(p.is_meta for p in model.parameters())  # dropped all the same
