"""Model cards: Hub metadata, load snippets per format, no local paths; the folder push_to_hub uploads."""

import json
import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.card import base_model_relation, pipeline_tag, read_record, write_folder_card
from hfcompress.data import WIKITEXT2_NAME

from conftest import W4G64, tiny_llama

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def assert_no_local_path(text: str, *folders: Path) -> None:
    for folder in folders:
        assert str(folder) not in text and str(folder.resolve()) not in text
    for token in re.findall(r"(?<![\w.-])/[^\s\"'`)|,]+", text):
        assert token == "/" or not Path(token).exists(), f"a local path in the card: {token}"


def load_card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_native_card_has_hub_metadata_a_load_snippet_and_a_metrics_table(tmp_path):
    model = hfcompress.compress(tiny_llama(), W4G64)
    config = model.config.quantization_config
    config.base_model, config.license = BASE, "apache-2.0"
    config.metrics["perplexity"] = {"perplexity": 12.34, "windows": 5, "seq_len": 64, "dataset": WIKITEXT2_NAME}
    config.metrics["perplexity_before_compression"] = 11.5
    model.save_pretrained(tmp_path / "tiny-w4", save_format="native")
    card = load_card(tmp_path / "tiny-w4")
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"hfcompress", "rtn", "4-bit"} <= set(card.data.tags)
    (result,) = card.data.eval_results  # this model's perplexity, not the one before compression
    assert (result.metric_type, result.metric_value, result.dataset_name) == ("perplexity", 12.34, WIKITEXT2_NAME)
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == (
        "Salesforce/wikitext", "wikitext-2-raw-v1", "test")
    assert 'import hfcompress' in card.text and 'AutoModelForCausalLM.from_pretrained("tiny-w4")' in card.text
    assert "| perplexity | 12.340 | WikiText-2 (raw, test) | 5 windows of 64 tokens |" in card.text
    assert "| perplexity before compression | 11.500 |" in card.text
    assert "group_size: 64" in card.text  # the recipe
    assert "bits per weight" in card.text and "quantized linear" in card.text
    assert_no_local_path(str(card), tmp_path)


def _hand_made_export(folder: Path, fmt: str, tmp_path: Path, record_in_config: bool = True) -> tuple[Path, dict]:
    """A folder in a peer format, as hfcompress writes it: that format's quantization_config,
    and our record (with the local paths old records kept) under the top-level ``hfcompress``
    key, or returned for the caller to pass (``hfcompress export``, which leaves it out)."""
    tiny_llama().save_pretrained(folder)  # not compressed: transformers' own save, no card
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": fmt}
    recipe = {"calibration": {"data": str(tmp_path / "calib.txt")},
              "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}
    record = {
        "quant_method": "hfcompress", "format_version": 1, "recipe": recipe, "base_model": BASE, "license": "mit",
        "quantized": [{"bits": 4, "group_size": 32, "sym": True, "modules": ["model.layers.0.mlp.up_proj"]}],
        "metrics": {"perplexity": {"perplexity": 20.5, "windows": 3, "seq_len": 64,
                                   "data": str(tmp_path / "texts" / "eval.txt")}},
    }
    if record_in_config:
        config["hfcompress"] = {**record, "storage": fmt}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, record


@pytest.mark.parametrize("fmt, readers, record_in_config", [
    ("compressed-tensors", ["pip install transformers compressed-tensors", "vllm serve tiny-export"], True),
    ("compressed-tensors", ["pip install transformers compressed-tensors", "vllm serve tiny-export"], False),
    ("gptq", ["gptqmodel", "vllm serve tiny-export", "sglang.launch_server --model-path tiny-export"], False),
])
def test_peer_format_card_needs_no_hfcompress(tmp_path, fmt, readers, record_in_config):
    folder, record = _hand_made_export(tmp_path / "tiny-export", fmt, tmp_path, record_in_config)
    write_folder_card(folder, record=None if record_in_config else record)
    card = load_card(folder)
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
    assert {"hfcompress", "gptq", "4-bit", fmt} <= set(card.data.tags)
    (result,) = card.data.eval_results
    assert (result.metric_value, result.dataset_name) == (20.5, "eval.txt")  # an old record's path, cut
    assert "import hfcompress" not in card.text
    assert 'AutoModelForCausalLM.from_pretrained("tiny-export")' in card.text
    assert all(reader in card.text for reader in readers)
    assert "data: calib.txt" in card.text  # the recipe, with its paths cut to names
    assert_no_local_path(str(card), tmp_path)


def test_a_folder_being_written_is_named_as_it_will_be(tmp_path):
    folder, _ = _hand_made_export(tmp_path / ".tiny-ct.tmp-4242-k3j_x9", "compressed-tensors", tmp_path)
    write_folder_card(folder, repo_id=None)
    assert 'from_pretrained("tiny-ct")' in load_card(folder).text
    write_folder_card(folder, repo_id="me/tiny-ct")
    assert 'from_pretrained("me/tiny-ct")' in load_card(folder).text


def test_plain_pruned_checkpoint_gets_a_card_without_hfcompress(tmp_path):
    model = hfcompress.compress(tiny_llama(), {"stages": [{"prune": {"ffn": 0.5, "importance": "magnitude"}}]})
    assert getattr(model.config, "quantization_config", None) is None  # saves as a plain checkpoint
    record = hfcompress.compression_record(model)
    assert record is not None and record.pruned is None  # kept for the card only
    record.base_model, record.license = BASE, "apache-2.0"
    model.save_pretrained(tmp_path / "tiny-pruned")
    assert "quantization_config" not in json.loads((tmp_path / "tiny-pruned" / "config.json").read_text())
    card = load_card(tmp_path / "tiny-pruned")
    assert card.data.base_model == BASE and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert {"hfcompress", "pruned"} <= set(card.data.tags)
    assert "import hfcompress" not in card.text and "plain transformers checkpoint" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("tiny-pruned")' in card.text
    assert card.data.eval_results is None  # nothing measured
    assert_no_local_path(str(card), tmp_path)


@pytest.mark.parametrize("stages, extra, relation", [
    (["quantize"], {}, "quantized"),
    (["prune", "quantize"], {}, "finetune"),
    (["share", "quantize"], {}, "merge"),
    (["share", "distill", "quantize"], {}, "finetune"),
    (["quantize"], {"shared": {"modules": {"a": "b"}}}, "merge"),  # recorded by an earlier compression
    ([], {}, None),
])
def test_base_model_relation_names_the_largest_change(stages, extra, relation):
    record = {"recipe": {"stages": [{name: {}} for name in stages]}, **extra}
    assert base_model_relation(record) == relation


@pytest.mark.parametrize("arch, tag", [
    ("LlamaForCausalLM", "text-generation"), ("GPT2LMHeadModel", "text-generation"),
    ("BertModel", "feature-extraction"), ("BertForMaskedLM", "fill-mask"),
    ("Gemma3ForConditionalGeneration", "image-text-to-text"), ("T5ForConditionalGeneration", "text2text-generation"),
    ("MyRemoteCodeForCausalLM", "text-generation"),
])
def test_pipeline_tag_from_architectures(arch, tag):
    assert pipeline_tag({"architectures": [arch]}) == tag


def test_cli_card_names_the_dataset_and_carries_the_license(tmp_path, tiny_llama_dir):
    from hfcompress.cli import main

    source = tmp_path / "tiny-source"
    shutil.copytree(tiny_llama_dir, source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    data = tmp_path / "texts" / "my-eval.txt"
    data.parent.mkdir()
    data.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife. " * 60)
    recipe = tmp_path / "w4.yaml"
    recipe.write_text("stages:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    out = tmp_path / "tiny-w4"
    assert main(["compress", str(source), "--recipe", str(recipe), "--output", str(out), "--data", str(data),
                 "--seq-len", "64", "--dtype", "float32"]) == 0
    metrics = read_record(json.loads((out / "config.json").read_text()))["metrics"]  # native or compressed-tensors
    assert metrics["perplexity"]["dataset"] == "my-eval.txt" and "data" not in metrics["perplexity"]
    card = load_card(out)
    assert card.data.license == "mit"
    assert card.data.eval_results[0].dataset_name == "my-eval.txt"
    assert 'from_pretrained("tiny-w4")' in card.text
    assert_no_local_path(str(card), tmp_path)


def test_push_to_hub_uploads_the_saved_folder_with_its_card(tmp_path, monkeypatch):
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded["repo"] = repo_id
        uploaded["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        uploaded["message"] = kwargs["commit_message"]

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = hfcompress.compress(tiny_llama(), W4G64)
    model.push_to_hub("me/tiny-w4", tags=["demo"])
    assert uploaded["repo"] == "me/tiny-w4"
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded["files"])
    readme = uploaded["files"]["README.md"].decode()
    assert "hfcompress" in readme and "demo" in readme and "## Recipe" in readme
    assert 'from_pretrained("me/tiny-w4")' in readme  # the card names the repository
    # What would be uploaded reloads: write it back out and load it.
    folder = tmp_path / "pushed"
    folder.mkdir()
    for name, data in uploaded["files"].items():
        (folder / name).write_bytes(data)
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder).model.layers[0].mlp.up_proj, hfcompress.QuantLinear)


def test_push_to_hub_of_plain_models_is_transformers_own(monkeypatch):
    from transformers.utils.hub import PushToHubMixin

    calls = []
    monkeypatch.setattr(PushToHubMixin, "push_to_hub", lambda self, repo_id, **kw: calls.append((repo_id, kw)))
    tiny_llama().push_to_hub("me/plain", commit_message="hi")
    assert calls == [("me/plain", {"commit_message": "hi"})]
