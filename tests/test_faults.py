"""Fault injection: SIGKILL at seeded points of save, overwrite, export and a resumed GPTQ run
(issue 17). After each kill, once recovered (what the next run or ``inspect`` does first), the
output is the complete old model or the complete new one, checksum for checksum, and nothing is
left beside it; a resumed GPTQ run then writes the same bytes as an uninterrupted one.

The kill points are file-system events (opening for writing, renaming, removing) counted by an
audit hook in the child (``scripts/fault_run.py``): every rename (where a folder changes hands) and
a seeded sample of the other events.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hfcompress
from hfcompress.export import export_model
from hfcompress.io import save_compressed
from hfcompress.output import recover_output

SCRIPT = Path(__file__).parent / "scripts" / "fault_run.py"
TRIALS = {"save": 10, "export": 10, "gptq": 12}  # 32 kills in all
RTN8 = {"stages": [{"quantize": {"method": "rtn", "bits": 8}}]}


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run(job: str, work: Path, kill_at: int | None = None, events: Path | None = None) -> int:
    command = [sys.executable, str(SCRIPT), job, str(work)]
    command += ["--kill-at", str(kill_at)] if kill_at else []
    command += ["--events", str(events)] if events else []
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


def kill_points(events: list[str], count: int, seed: int) -> list[int]:
    """Every rename, then a seeded sample of the other events (1-based positions)."""
    renames = [i + 1 for i, e in enumerate(events) if e in ("os.rename", "os.replace")]
    others = [i + 1 for i in range(len(events)) if i + 1 not in renames]
    rng = random.Random(seed)
    return sorted(renames + rng.sample(others, max(0, min(len(others), count - len(renames)))))


@pytest.fixture(scope="module")
def templates(tmp_path_factory, tiny_llama_dir):
    """Per job: a work folder whose ``out`` holds the old model; a kill trial runs on a copy."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("faults")
    old = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hfcompress.compress(old, RTN8)

    save = root / "save"
    save_compressed(old, save / "out")

    export = root / "export"
    source = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hfcompress.compress(source, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]})
    save_compressed(source, export / "source", save_format="native")
    export_model(export / "source", "gptq", export / "out")

    gptq = root / "gptq"
    shutil.copytree(tiny_llama_dir, gptq / "tiny")
    (gptq / "gptq.yaml").write_text("stages:\n  - quantize: {method: gptq, bits: 4, group_size: 32}\n")
    windows = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": windows}, gptq / "windows.safetensors")
    save_compressed(old, gptq / "out")
    return {"save": save, "export": export, "gptq": gptq}


def _copy(template: Path, to: Path) -> Path:
    shutil.copytree(template, to)
    return to


def _leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if p.name.startswith(".") or p.name.endswith(".resume"))


@pytest.mark.parametrize("job", list(TRIALS))
def test_a_killed_write_leaves_the_old_or_the_new_output_whole(templates, tmp_path, job):
    template = templates[job]
    old = checksums(template / "out")
    reference = _copy(template, tmp_path / "reference")
    run(job, reference, events=tmp_path / "events.json")
    new = checksums(reference / "out")
    assert new != old and _leftovers(reference) == []
    events = json.loads((tmp_path / "events.json").read_text())
    points = kill_points(events, TRIALS[job], seed=17)
    assert len(points) >= TRIALS[job] // 2
    outcomes = {"old": 0, "new": 0}
    for point in points:
        work = _copy(template, tmp_path / f"kill-{point}")
        assert run(job, work, kill_at=point) == -signal.SIGKILL
        recover_output(work / "out")
        found = checksums(work / "out")
        assert found in (old, new), f"{job} killed at event {point} ({events[point - 1]}): a mixed or broken output"
        outcomes["old" if found == old else "new"] += 1
        if job == "gptq":  # the rerun resumes from what the killed run kept, to the same bytes
            assert run(job, work) == 0
            assert checksums(work / "out") == new, f"resumed after a kill at event {point}: other bytes"
        assert _leftovers(work) == [], f"{job} killed at event {point}: left {_leftovers(work)}"
        shutil.rmtree(work)
    print(f"{job}: {len(events)} events, killed at {points}: {outcomes}")  # for the record (pytest -s)
    assert outcomes["old"] and outcomes["new"], outcomes  # kills landed before and after the switch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
def test_finiteness_check_sees_one_bad_value_anywhere(dtype, bad):
    from hfcompress.precision import all_finite

    tensor = torch.randn(37, 53).to(dtype)
    if bad is not None:
        tensor[29, 41] = bad
    assert all_finite(tensor) == (bad is None)
    assert all_finite(torch.empty(0, 4, dtype=dtype))


def test_finiteness_check_reads_float8_weights():
    from hfcompress.precision import all_finite

    tensor = torch.randn(8, 8).to(torch.float8_e4m3fn)
    assert all_finite(tensor)
    tensor[3, 5] = float("nan")
    assert not all_finite(tensor)
