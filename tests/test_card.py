"""Model cards and the folder that push_to_hub would upload."""

import huggingface_hub
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hfcompress

from conftest import W4G64, tiny_llama


def test_save_pretrained_writes_a_card_with_hub_metadata(tmp_path):
    model = hfcompress.compress(tiny_llama(), W4G64)
    model.config.quantization_config.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config.quantization_config.metrics["perplexity"] = 12.34
    model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.library_name == "transformers"
    assert {"hfcompress", "rtn", "4-bit"} <= set(card.data.tags)
    assert "group_size: 64" in card.text  # the recipe
    assert "bits per weight" in card.text and "quantized linear" in card.text
    assert "**perplexity**: `12.34`" in card.text


def test_push_to_hub_uploads_the_saved_folder_with_its_card(tmp_path, monkeypatch):
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

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
