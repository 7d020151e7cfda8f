"""One run per output (a lock naming its holder), and a resume folder that is either consistent or
refused with advice (issue 17, class 6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.errors import UserError
from hfcompress.output import OutputLockedError, atomic_output, output_lock, recover_output

GPTQ = {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 64}}]}


def _holder(path, tmp_path):
    """A separate process holding the lock of ``path`` until its stdin closes."""
    script = textwrap.dedent(f"""
        import sys
        from hfcompress.output import output_lock
        with output_lock({str(path)!r}):
            print("held", flush=True)
            sys.stdin.read()
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out, tmp_path)
    try:
        with pytest.raises(OutputLockedError, match=rf"being written by another hfcompress run \(PID {holder.pid}\)"):
            with atomic_output(out):
                pass
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
    finally:
        holder.communicate("")
    with atomic_output(out) as staging:  # free again once the holder is done
        (staging / "f").write_text("x")
    assert (out / "f").read_text() == "x" and not (tmp_path / ".out.lock").exists()


def test_a_killed_holder_releases_the_lock_and_its_file_is_cleaned(tmp_path):
    out = tmp_path / "out"
    holder = _holder(out, tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".out.lock").exists()  # the kernel released the lock; the file stayed
    recover_output(out)
    assert not (tmp_path / ".out.lock").exists()
    with output_lock(out):
        with output_lock(out):  # re-entrant within a process
            pass
        assert (tmp_path / ".out.lock").exists()
    assert not (tmp_path / ".out.lock").exists()


def test_the_cli_refuses_a_second_run_on_the_same_output(tmp_path, tiny_llama_dir, capsys):
    from hfcompress.cli import main

    out = tmp_path / "out"
    holder = _holder(out, tmp_path)
    try:
        assert main(["compress", str(tiny_llama_dir), "--recipe", "w4-rtn", "--output", str(out), "--no-eval"]) == 2
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.communicate("")


def test_two_runs_resuming_from_one_folder_are_refused(tmp_path, tiny_llama_dir):
    state = tmp_path / "state"
    holder = _holder(state, tmp_path)
    try:
        with pytest.raises(OutputLockedError, match=f"PID {holder.pid}"):
            hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), GPTQ,
                                calibration_data=torch.randint(2, 300, (2, 32)), resume_dir=state)
    finally:
        holder.communicate("")


@pytest.fixture
def interrupted(tmp_path, tiny_llama_dir, monkeypatch):
    """A resume folder holding one finished block of two."""
    from hfcompress.quantization import gptq_runner

    original = gptq_runner.GPTQBlockQuantizer.quantize_block
    calls = {"n": 0}

    def crash_in_second_block(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gptq_runner.GPTQBlockQuantizer, "quantize_block", crash_in_second_block)
    windows = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(2))
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), GPTQ, calibration_data=windows,
                            resume_dir=state)
    monkeypatch.setattr(gptq_runner.GPTQBlockQuantizer, "quantize_block", original)
    assert json.loads((state / "stage0" / "state.json").read_text())["blocks_done"] == 1
    return state, windows


def _break_state(state, how: str) -> None:
    folder = state / "stage0"
    record = json.loads((folder / "state.json").read_text())
    if how == "not json":
        (folder / "state.json").write_text("{truncated")
    elif how == "block file missing":
        (folder / "block_0000.safetensors").unlink()
    elif how == "more blocks claimed":
        record["blocks_done"] = 4
        (folder / "state.json").write_text(json.dumps(record))
    elif how == "a path as hidden states":
        record["hidden"] = "../../etc/passwd"
        (folder / "state.json").write_text(json.dumps(record))
    elif how == "truncated block":
        block = folder / "block_0000.safetensors"
        block.write_bytes(block.read_bytes()[:100])
    elif how == "fields missing":
        (folder / "state.json").write_text(json.dumps({"key": record["key"]}))


@pytest.mark.parametrize("how", ["not json", "block file missing", "more blocks claimed", "a path as hidden states",
                                 "truncated block", "fields missing"])
def test_a_corrupt_resume_folder_is_refused_with_advice(interrupted, tiny_llama_dir, how):
    state, windows = interrupted
    _break_state(state, how)
    with pytest.raises(UserError, match=rf"{state} is corrupt \(.*\): delete {state} to start over"):
        hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), GPTQ, calibration_data=windows,
                            resume_dir=state)
