"""Model sources and atomic, non-clobbering saves."""

import os

import pytest
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.errors import ModelSourceError, OutputExistsError
from hfcompress.io import ModelSource, check_output, load_model, read_license, resolve_model_source, save_compressed

from conftest import W4G64, tiny_llama


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_save_is_atomic_when_saving_fails(tmp_path, monkeypatch):
    model = hfcompress.compress(tiny_llama(), W4G64)
    original = type(model).save_pretrained

    def failing_save(self, directory, *args, **kwargs):
        original(self, directory, *args, **kwargs)  # files are written ...
        raise RuntimeError("disk full")  # ... then the save fails

    monkeypatch.setattr(type(model), "save_pretrained", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_compressed(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path):
    model = hfcompress.compress(tiny_llama(), W4G64)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_compressed(model, out)
    assert (out / "keep.txt").read_text() == "mine"
    save_compressed(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == []
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's private one
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj, hfcompress.QuantLinear)


def test_empty_existing_folder_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_output(tmp_path / "file", overwrite=True)


def test_model_sources(tmp_path, tiny_llama_dir):
    assert resolve_model_source(tiny_llama_dir).gguf_file is None
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(gguf).gguf_file == "m.gguf"
    assert resolve_model_source(tmp_path).gguf_file == "m.gguf"  # a folder holding one .gguf
    assert resolve_model_source("org/name").hub_id == "org/name"
    with pytest.raises(ModelSourceError, match="no such file or folder"):
        resolve_model_source("./missing-folder")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_model_source(tmp_path / "w.txt")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # The offline flag is read at import time; patch the constant so no request is attempted.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelSourceError, match="cannot load model 'nobody/no-such-model'.*Hub may be unreachable"):
        load_model("nobody/no-such-model")


def test_license_is_read_from_gguf_metadata_a_folder_card_or_the_hub(tmp_path, monkeypatch, caplog):
    import logging

    from gguf import GGUFWriter
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import LocalEntryNotFoundError

    writer = GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_license("apache-2.0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert read_license(ModelSource(str(tmp_path), "m.gguf")) == "apache-2.0"

    folder = tmp_path / "folder"
    folder.mkdir()
    assert read_license(ModelSource(str(folder))) is None  # no card
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a model\n")
    assert read_license(ModelSource(str(folder))) == "mit"

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(ModelCard, "load", offline)
    with caplog.at_level(logging.DEBUG, logger="hfcompress.io"):
        assert read_license(ModelSource("org/name", hub_id="org/name")) is None
    assert "license unknown" in caplog.text

    def online(repo_id, **kwargs):
        raise AssertionError("online=False asked the Hub")

    monkeypatch.setattr(ModelCard, "load", online)
    assert read_license(ModelSource("org/name", hub_id="org/name"), online=False) is None


def test_load_model_picks_the_class_and_passes_compression(tiny_llama_dir, tiny_bert_dir):
    model, tokenizer, source = load_model(tiny_llama_dir, compression=W4G64)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer is not None
    assert isinstance(model.model.layers[0].mlp.up_proj, hfcompress.QuantLinear)
    model, _, _ = load_model(tiny_bert_dir)
    assert type(model).__name__ == "BertModel"
