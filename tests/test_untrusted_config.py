"""A saved folder's config.json and tensors are untrusted input: every field is checked before
anything is built or allocated from it, and a bad one is one clear CheckpointError (issue 17)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import READS, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.errors import CheckpointError
from hfcompress.report import summarize_folder

WINDOWS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
RTN = {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two folders: non-uniformly pruned then quantized; shared with LoRA deltas then quantized."""
    root = tmp_path_factory.mktemp("untrusted")
    pruned = tiny_llama(num_hidden_layers=3, num_key_value_heads=6)
    hfcompress.compress(pruned, {"stages": [{"prune": {"heads": 3, "ffn": 0.5, "uniform": False}}, RTN]},
                        calibration_data=WINDOWS)
    pruned.save_pretrained(root / "pruned")
    shared = tiny_llama(num_hidden_layers=4)
    hfcompress.compress(shared, {"stages": [{"share": {"every": 2, "parts": ["mlp"], "lora_rank": 2}}, RTN]})
    shared.save_pretrained(root / "shared")
    return root


def _edit(saved, tmp_path, which: str, change) -> str:
    folder = tmp_path / which
    shutil.copytree(saved / which, folder)
    config = json.loads((folder / "config.json").read_text())
    change(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _set(*path_and_value):
    *path, key, value = path_and_value

    def change(record):
        for part in path:
            record = record[part]
        record[key] = value

    return change


SHARED_USER = "model.layers.1.mlp.up_proj.base"
CASES = {
    # where a field goes wrong: (folder, edit, what the message says)
    "recipe as a path": ("shared", _set("recipe", "/etc/passwd"), r"recipe: expected the recipe as a mapping"),
    "recipe a number": ("shared", _set("recipe", 5), r"recipe: expected the recipe as a mapping"),
    "format version 0": ("shared", _set("format_version", 0), r"format_version: expected 1, got 0"),
    "format version -7": ("shared", _set("format_version", -7), r"format_version: expected 1, got -7"),
    "format version '99'": ("shared", _set("format_version", "99"), r"format_version: expected 1, got '99'"),
    "format version true": ("shared", _set("format_version", True), r"format_version: expected 1, got True"),
    "format version newer": ("shared", _set("format_version", 2), r"upgrade hfcompress"),
    "unknown key": ("shared", _set("bitz", 4), r"unknown key"),
    "bits a string": ("shared", _set("quantized", 0, "bits", "4"), r"quantized\[0\]\.bits: expected 2, 3, 4 or 8"),
    "group size huge": ("shared", _set("quantized", 0, "group_size", 10**30), r"group_size: expected a whole number"),
    "group size float": ("shared", _set("quantized", 0, "group_size", 32.0), r"group_size: expected a whole number"),
    "group size zero": ("shared", _set("quantized", 0, "group_size", 0), r"group_size: expected -1"),
    "sym a string": ("shared", _set("quantized", 0, "sym", "yes"), r"sym: expected true or false"),
    "scale dtype": ("shared", _set("quantized", 0, "scale_dtype", "int8"), r"scale_dtype: expected float16"),
    "modules a string": ("shared", _set("quantized", 0, "modules", "model.layers.0.self_attn.q_proj"),
                         r"modules: expected a list of module names"),
    "module unknown": ("shared", lambda r: r["quantized"][0]["modules"].append("model.nope"), r"names 'model.nope'"),
    "module twice": ("shared", lambda r: r["quantized"][0]["modules"].append(r["quantized"][0]["modules"][0]),
                     r"each module named once"),
    "quantized a mapping": ("shared", _set("quantized", {"a": 1}), r"quantized: expected a list"),
    "lora rank huge": ("shared", _set("shared", "lora", "rank", 100_000_000), r"lora\.rank is 100000000, more than"),
    "lora rank string": ("shared", _set("shared", "lora", "rank", "2"), r"lora\.rank: expected a whole number"),
    "lora rank negative": ("shared", _set("shared", "lora", "rank", -1), r"lora\.rank: expected a whole number"),
    "lora module unknown": ("shared", lambda r: r["shared"]["lora"]["modules"].append("model.zzz"),
                            r"shared\.lora\.modules names 'model\.zzz'"),
    "owner unknown": ("shared", _set("shared", "modules", SHARED_USER, "model.nope"), r"names 'model\.nope'"),
    "owner of another shape": ("shared", _set("shared", "modules", SHARED_USER, "model.layers.0.mlp.down_proj.base"),
                               r"cannot share .* weights \(a different kind or shape"),
    "owner itself": ("shared", _set("shared", "modules", SHARED_USER, SHARED_USER), r"not itself a user"),
    "metrics a list": ("shared", _set("metrics", [1]), r"metrics: expected a mapping"),
    "base model a number": ("shared", _set("base_model", 3), r"base_model: expected a short string"),
    "storage unknown": ("shared", _set("storage", "x"), r"storage: expected hfcompress or compressed-tensors"),
    "pruned heads huge": ("pruned", _set("pruned", "layers", 0, "heads", 10**6), r"does not fit inside the unpruned"),
    "pruned heads negative": ("pruned", _set("pruned", "layers", 0, "heads", -1), r"heads: expected a whole number"),
    "pruned ffn huge": ("pruned", _set("pruned", "layers", 0, "ffn", 10**9), r"does not fit inside the unpruned"),
    "pruned kv above heads": ("pruned", _set("pruned", "layers", 0, "kv_heads", 7), r"kv_heads: expected a whole number"),
    "pruned head_dim string": ("pruned", _set("pruned", "head_dim", "16"), r"head_dim: expected a whole number"),
    "pruned head_dim other": ("pruned", _set("pruned", "head_dim", 8), r"pruned\.head_dim is 8, the model's is 16"),
    "pruned layers missing": ("pruned", lambda r: r["pruned"].pop("layers"), r"pruned: expected a mapping"),
    "pruned extra key": ("pruned", _set("pruned", "layers", 0, "foo", 1), r"layers\[0\]: expected a mapping"),
    "pruned a layer short": ("pruned", lambda r: r["pruned"]["layers"].pop(), r"describes 2 layers, the model has 3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_corrupt_field_is_one_clear_error_before_loading(saved, tmp_path, case):
    which, change, message = CASES[case]
    folder = _edit(saved, tmp_path, which, change)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("case", ["recipe as a path", "format version 0", "lora rank string", "pruned heads negative"])
def test_our_readers_refuse_the_same_fields(saved, tmp_path, case):
    which, change, message = CASES[case]
    with pytest.raises(CheckpointError, match=message):
        summarize_folder(_edit(saved, tmp_path, which, change))


def test_a_recipe_is_never_read_from_a_path_named_in_the_checkpoint(saved, tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text("stages:\n  - quantize: {bits: 4}\n")  # a valid recipe: reading it would raise nothing
    folder = _edit(saved, tmp_path, "shared", _set("recipe", str(secret)))
    READS.paths.clear()
    READS.watching = True
    try:
        with pytest.raises(CheckpointError, match="expected the recipe as a mapping"):
            AutoModelForCausalLM.from_pretrained(folder)
    finally:
        READS.watching = False
    assert str(secret) not in READS.paths


@pytest.mark.parametrize("tensor, dtype, shown", [("qweight", torch.float32, "F32 (expected I32)"),
                                                  ("scales", torch.int8, "I8 (expected F16)"),
                                                  ("qzeros", torch.int64, "I64 (expected I32)")])
def test_packed_tensors_of_the_wrong_dtype_are_refused(saved, tmp_path, tensor, dtype, shown):
    folder = tmp_path / "m"
    shutil.copytree(saved / "shared", folder)
    tensors = load_file(folder / "model.safetensors")
    key = f"model.layers.0.self_attn.q_proj.{tensor}"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=re.escape(f"wrong dtype {key} {shown}")):
        AutoModelForCausalLM.from_pretrained(folder)


def test_scales_in_another_float_precision_still_load(saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved / "shared", folder)
    expected = AutoModelForCausalLM.from_pretrained(folder)(WINDOWS[:1]).logits
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.scales"
    tensors[key] = tensors[key].float()  # exact: float16 values widened
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(WINDOWS[:1]).logits, expected)


@pytest.mark.parametrize("text", [b"\xff\xfe not utf-8", b"{not json", b"[1, 2]"])
def test_a_config_that_is_not_json_is_a_clear_error(saved, tmp_path, text):
    folder = tmp_path / "m"
    shutil.copytree(saved / "shared", folder)
    (folder / "config.json").write_bytes(text)
    with pytest.raises(CheckpointError, match="config.json"):
        summarize_folder(folder)
