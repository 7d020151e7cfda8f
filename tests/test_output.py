"""Outputs never cost the user data: an output that is the input is refused, an interrupted
replacement is put back, stale staging folders go, and exports copy nothing from outside the
model folder."""

import os
import shutil

import pytest

import hfcompress
from hfcompress.cli import main
from hfcompress.errors import CheckpointError, OutputExistsError
from hfcompress.export import export_model
from hfcompress.output import atomic_output, check_output

from conftest import tiny_llama

DEAD_PID = 2**22 + 12345  # above the kernel's pid_max: no such process


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_an_output_that_is_the_input_or_holds_it_is_refused(tmp_path, tiny_llama_dir, capsys):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_llama_dir, model)
    before = listing(model)
    for output in (model, model.parent, tmp_path):
        assert main(["compress", str(model), "--output", str(output), "--overwrite", "--no-eval"]) == 2
        assert "would delete it" in capsys.readouterr().err
    assert listing(model) == before
    saved = tmp_path / "saved"
    hfcompress.save_compressed(hfcompress.compress(tiny_llama(), "w8-rtn"), saved)
    for output in (saved, tmp_path):
        with pytest.raises(OutputExistsError, match="would delete it"):
            export_model(saved, "compressed-tensors", output, overwrite=True)
    assert "config.json" in listing(saved)


def test_a_replacement_killed_between_its_renames_is_put_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f".out.old-{DEAD_PID}-abc"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "model.safetensors").write_text("the old model")
    staging = tmp_path / f".out.tmp-{DEAD_PID}-def"
    staging.mkdir()
    (staging / "half").write_text("unfinished")
    live = tmp_path / f".out.tmp-{os.getppid()}-ghi"  # a running process's staging folder stays
    live.mkdir()
    with pytest.raises(OutputExistsError, match="not empty"):  # the old output is back, so it is refused
        check_output(out, overwrite=False)
    assert (out / "model.safetensors").read_text() == "the old model"
    assert listing(tmp_path) == sorted(["out", live.name])


def test_a_failed_write_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=True) as staging:
            (staging / "new").write_text("new")
            raise RuntimeError("killed")
    assert listing(tmp_path) == ["out"] and listing(out) == ["keep"]
    with atomic_output(out, overwrite=True) as staging:
        (staging / "new").write_text("new")
    assert listing(tmp_path) == ["out"] and listing(out) == ["new"]


def test_exports_copy_nothing_linked_from_outside_the_model_folder(tmp_path):
    saved = tmp_path / "saved"
    hfcompress.save_compressed(hfcompress.compress(tiny_llama(), "w8-rtn"), saved)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (saved / "notes.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="links outside the model folder"):
        export_model(saved, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    (saved / "notes.txt").unlink()
    (saved / "inside.txt").write_text("ours")
    (saved / "alias.txt").symlink_to(saved / "inside.txt")  # inside the folder: fine
    export_model(saved, "compressed-tensors", tmp_path / "ct")
    assert (tmp_path / "ct" / "alias.txt").read_text() == "ours"


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["compress", str(tiny_llama_dir), "--output", str(tmp_path / "dangling"), "--no-eval"]) == 2
    assert "is a link" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    text = tmp_path / "t.txt"
    text.write_text("words " * 50)
    assert main(["eval", str(tiny_llama_dir), "--json", str(tmp_path / "folder"), "--data", str(text)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        assert main(["compress", str(tiny_llama_dir), "--output", str(locked / "out"), "--no-eval"]) == 2
        assert "not writable" in capsys.readouterr().err


def test_a_bad_kernel_mode_in_the_environment_warns_and_commands_still_run(tmp_path, tiny_llama_dir):
    import subprocess
    import sys

    env = {**os.environ, "HFCOMPRESS_KERNELS": "bogus"}
    done = subprocess.run([sys.executable, "-m", "hfcompress.cli", "inspect", str(tiny_llama_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # the environment is read when a kernel is chosen, not at import
    forward = ("import torch, hfcompress; from hfcompress.quantization.rtn import quantize_rtn; "
               "fmt = hfcompress.LinearFormat(4, 32, True); linear = torch.nn.Linear(64, 8); "
               "layer = hfcompress.QuantLinear.from_quantized(quantize_rtn(linear.weight, 4, 32, True), None, fmt); "
               "print(layer(torch.randn(2, 64)).shape)")
    done = subprocess.run([sys.executable, "-c", forward], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "torch.Size([2, 8])" in done.stdout, done.stderr
    assert "HFCOMPRESS_KERNELS='bogus' is not a kernel mode (valid: auto, reference, triton): using auto" in done.stderr
