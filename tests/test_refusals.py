"""User errors of every kind end the same way: exit 2, one line naming the problem and the fix,
and nothing written (issue 17, class 7)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import hfcompress
from hfcompress.cli import main

GPTQ = "calibration: {samples: 2, seq_len: 32}\nstages:\n  - quantize: {method: gptq, bits: 4, group_size: 32}\n"


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("refusals") / "q"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hfcompress.compress(model, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]})
    model.save_pretrained(folder)  # no tokenizer beside it
    return folder


def refused(capsys, argv, message: str, work) -> None:
    before = sorted(os.listdir(work))
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hfcompress:")]
    assert len(err) == 1 and err[0].startswith("hfcompress: error: "), err
    assert message in err[0], err[0]
    assert sorted(os.listdir(work)) == before  # nothing written, no output, no staging, no lock


def _windows(path, ids) -> str:
    save_file({"input_ids": ids}, path)
    return str(path)


WINDOWS = {
    "outside the vocabulary": (torch.full((2, 32), 5000), "token id 5000 is outside the model's vocabulary (0..299)"),
    "negative": (torch.full((2, 32), -3), "token id -3 is outside the model's vocabulary"),
    "empty": (torch.zeros((0, 32), dtype=torch.long), "no token ids (shape [0, 32])"),
    "floats": (torch.ones((2, 32)), "token ids must be integers, not float32"),
}


@pytest.mark.parametrize("case", list(WINDOWS))
def test_calibration_windows_that_are_not_this_models_token_ids(tmp_path, tiny_llama_dir, capsys, case):
    ids, message = WINDOWS[case]
    (tmp_path / "gptq.yaml").write_text(GPTQ)
    argv = ["compress", str(tiny_llama_dir), "--recipe", str(tmp_path / "gptq.yaml"), "--output", str(tmp_path / "out"),
            "--calibration-data", _windows(tmp_path / "w.safetensors", ids), "--no-eval"]
    refused(capsys, argv, message, tmp_path)


def test_a_truncated_windows_file_is_refused_before_the_model_loads(tmp_path, tiny_llama_dir, capsys):
    path = _windows(tmp_path / "w.safetensors", torch.ones((2, 32), dtype=torch.long))
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 40)
    (tmp_path / "gptq.yaml").write_text(GPTQ)
    argv = ["compress", str(tiny_llama_dir), "--recipe", str(tmp_path / "gptq.yaml"), "--output", str(tmp_path / "out"),
            "--calibration-data", path, "--no-eval"]
    refused(capsys, argv, "w.safetensors: truncated or corrupt safetensors file", tmp_path)


def test_a_text_folder_with_a_file_that_is_not_utf8(tmp_path, tiny_llama_dir, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("plain words " * 500)
    (texts / "b.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (tmp_path / "gptq.yaml").write_text(GPTQ)
    argv = ["compress", str(tiny_llama_dir), "--recipe", str(tmp_path / "gptq.yaml"), "--output", str(tmp_path / "out"),
            "--calibration-data", str(texts), "--no-eval"]
    refused(capsys, argv, "b.txt: not UTF-8 text (byte 3 is b'\\xe9'); convert it to UTF-8", tmp_path)


@pytest.mark.parametrize("content, message", [(b"GGUF" + bytes(range(256)) * 4, "not a GGUF file transformers can read"),
                                              (bytes(range(256)) * 4, "does not start with the GGUF magic bytes")])
def test_a_garbage_gguf_file(tmp_path, capsys, content, message):
    (tmp_path / "model.gguf").write_bytes(content)
    argv = ["compress", str(tmp_path / "model.gguf"), "--recipe", "w4-rtn", "--output", str(tmp_path / "out"), "--no-eval"]
    refused(capsys, argv, message, tmp_path)


def test_remote_code_is_refused_unless_asked(tmp_path, tiny_llama_dir, capsys):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mything", architectures=["MyModel"],
                  auto_map={"AutoConfig": "code.MyConfig", "AutoModelForCausalLM": "code.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "code.py").write_text("raise SystemExit('remote code ran')\n")
    argv = ["compress", str(folder), "--recipe", "w4-rtn", "--output", str(tmp_path / "out"), "--no-eval"]
    refused(capsys, argv, "runs its own Python code to load, which hfcompress does not run unless asked", tmp_path)


def test_a_truncated_export_source(tmp_path, quantized_dir, capsys):
    source = tmp_path / "q"
    shutil.copytree(quantized_dir, source)
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = ["export", str(source), "--format", "compressed-tensors", "--output", str(tmp_path / "out")]
    refused(capsys, argv, "model.safetensors: truncated or corrupt safetensors file", tmp_path)


def test_eval_of_a_model_without_a_tokenizer(tmp_path, quantized_dir, capsys):
    (tmp_path / "a.txt").write_text("plain words " * 500)
    argv = ["eval", str(quantized_dir), "--data", str(tmp_path / "a.txt")]
    refused(capsys, argv, "a tokenizer is needed to read text and none came with the model", tmp_path)


@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_eval_and_inspect_refuse_a_corrupt_config_field(tmp_path, quantized_dir, capsys, command):
    folder = tmp_path / "q"
    shutil.copytree(quantized_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    record = config.get("hfcompress") or config["quantization_config"]  # a compressed-tensors save carries ours aside
    record["quantized"][0]["group_size"] = "thirty-two"
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "a.txt").write_text("plain words " * 500)
    argv = [command, str(folder)] + (["--data", str(tmp_path / "a.txt")] if command == "eval" else [])
    refused(capsys, argv, "quantized[0].group_size: expected a whole number", tmp_path)
