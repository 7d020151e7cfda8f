"""The hfcompress command on tiny models: exit codes, atomic output, refusal to overwrite."""

import json
import shutil
import subprocess
import sys

import pytest

from hfcompress.cli import main


def entries(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "w4.yaml"
    path.write_text("stages:\n  - quantize: {method: rtn, bits: 4, group_size: 64}\n")
    return path


def test_compress_then_inspect_then_eval(tmp_path, tiny_llama_dir, recipe_file, capsys):
    out = tmp_path / "out"
    data = tmp_path / "eval.txt"
    data.write_text("It is a truth universally acknowledged, that a single man must be in want of a wife. " * 60)
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(recipe_file), "--output", str(out),
                 "--data", str(data), "--seq-len", "64", "--dtype", "float32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "bits per weight" in printed
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(entries(out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["metrics"]["perplexity"]["windows"] >= 5

    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["methods"] == ["quantize:rtn"] and summary["quantized"][0]["bits"] == 4
    qbits = summary["by_type"]["quantized linear"]["bits_per_weight"]
    assert 4.0 < qbits < 5.0  # 4-bit codes plus group-64 scales and zeros
    assert main(["inspect", str(out)]) == 0
    assert "quantized linear" in capsys.readouterr().out

    result_file = tmp_path / "ppl.json"
    assert main(["eval", str(out), "--data", str(data), "--seq-len", "64", "--json", str(result_file)]) == 0
    stdout = json.loads(capsys.readouterr().out)  # not a terminal: JSON on stdout
    assert stdout == json.loads(result_file.read_text())
    assert stdout["windows"] >= 5 and stdout["perplexity"] > 1


def test_bad_recipe_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - quantize: {bits: 5}\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(bad), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hfcompress: error: recipe stages[0].quantize.bits: 5 is not a valid bit width; valid: 2, 3, 4, 8"
    assert entries(tmp_path) == ["bad.yaml"]


@pytest.mark.parametrize("argv, message", [
    (["compress", "MODEL", "--recipe", "nope"], "neither a YAML file nor a bundled recipe"),
    (["compress", "./no/such/model", "--recipe", "w4-rtn"], "no such file or folder"),
    (["eval", "MODEL", "--data", "./missing.txt"], "./missing.txt: no such file or folder"),
    (["eval", "MODEL", "--data", "nobody/no-such-dataset"], "nor a dataset that could be loaded"),
    (["inspect", "./no-such-dir"], "no config.json"),
])
def test_user_errors_exit_2(tmp_path, tiny_llama_dir, argv, message, capsys, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    argv = [str(tiny_llama_dir) if a == "MODEL" else a for a in argv]
    assert main(argv + (["--output", "out"] if argv[0] == "compress" else [])) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("hfcompress:")]
    assert len(ours) == 1 and message in ours[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    assert main(["compress", str(tiny_llama_dir), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert entries(out) == ["precious.txt"]
    assert main(["compress", str(tiny_llama_dir), "--output", str(out), "--overwrite"]) == 0
    assert "precious.txt" not in entries(out) and "model.safetensors" in entries(out)
    assert entries(tmp_path) == ["out"]  # no temporary folders left beside it


def test_corrupt_checkpoint_exits_2(tmp_path, tiny_llama_dir, capsys):
    folder = tmp_path / "m"
    assert main(["compress", str(tiny_llama_dir), "--output", str(folder), "--no-eval"]) == 0
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["eval", str(folder), "--data", str(tiny_llama_dir / "tokenizer.json"), "--seq-len", "32"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_console_script_exit_codes(tmp_path, tiny_llama_dir):
    exe = shutil.which("hfcompress") or [sys.executable, "-m", "hfcompress.cli"]
    cmd = [exe] if isinstance(exe, str) else exe
    bad = subprocess.run(cmd + ["compress", str(tiny_llama_dir), "--recipe", "missing.yaml", "--output",
                                str(tmp_path / "o")], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    usage = subprocess.run(cmd + ["frobnicate"], capture_output=True, text=True)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_compress_with_a_prune_recipe_writes_a_plain_checkpoint(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text("calibration: {samples: 4, seq_len: 32}\nstages:\n  - prune: {heads: 3, ffn: 0.25}\n")
    out = tmp_path / "out"
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out), "--no-eval",
                 "--calibration-data", str(tiny_llama_dir / "tokenizer.json")]) == 0
    assert "size:" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_attention_heads"] == 3
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantized"] == [] and summary["by_type"]["float linear"]["params"] > 0


def test_calibrated_recipes_say_how_long_they_will_take_before_starting(tmp_path, tiny_llama_dir, capsys):
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("calibration: {samples: 4, seq_len: 32}\n"
                      "stages:\n  - quantize: {method: gptq, bits: 4, group_size: 32}\n")
    code = main(["compress", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(tmp_path / "out"),
                 "--no-eval", "--dtype", "bfloat16"])
    assert code == 0
    log = capsys.readouterr().err
    announced = log.index("calibrating on 4 windows of 32 tokens")
    assert announced < log.index("stage 1/1: quantize")
    assert "computed in float32" in log or "computed in the model's dtype" in log


def test_calibration_estimate_leaves_the_model_as_it_was():
    import torch

    from hfcompress.calibration import PASSES_PER_WINDOW, estimate_calibration_seconds

    from conftest import tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    window, total = estimate_calibration_seconds(model, samples=8, seq_len=64, dtype=torch.float32)
    assert window > 0 and total == pytest.approx(window * (8 * PASSES_PER_WINDOW + 2))
    after = model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "--seq-len: 0 must be at least 1"),
    (["--seq-len", "-5"], "--seq-len: -5 must be at least 1"),
    (["--stride", "0"], "--stride: 0 must be at least 1"),
    (["--batch-size", "0"], "--batch-size: 0 must be at least 1"),
    (["--max-windows", "x"], "--max-windows: 'x' is not a whole number"),
])
def test_bad_numbers_on_the_command_line_exit_2_with_one_line(tmp_path, tiny_llama_dir, argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["eval", str(tiny_llama_dir), *argv])
    assert caught.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("bogus", "'bogus' is not a device"),
                                             ("cuda:7", "no such CUDA device")])
def test_bad_devices_exit_2_before_loading(tmp_path, tiny_llama_dir, device, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["compress", str(tiny_llama_dir), "--device", device, "--output", str(tmp_path / "o")])
    assert caught.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
