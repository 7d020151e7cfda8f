"""One write of an output, killed with SIGKILL at a chosen file-system event, for the
fault-injection test (tests/test_faults.py).

``python fault_run.py JOB WORK [--kill-at N] [--events FILE]``: JOB is ``save`` (save a quantized
model over ``WORK/out``), ``export`` (export ``WORK/source`` over ``WORK/out``) or ``gptq`` (the
CLI's ``compress --resume`` of ``WORK/tiny`` into ``WORK/out``). An audit hook counts the events
that change the file system (opening for writing, renaming, removing, making folders); at the
``N``-th the process kills itself, before the operation happens. ``--events`` writes the list of
events a whole run makes, from which the test picks its kill points.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate",
           "shutil.copyfile", "os.link", "os.symlink"}


def _is_change(event: str, args: tuple) -> bool:
    if event == "open":
        _, mode, flags = args
        return bool(mode and any(c in mode for c in "wax+")) or bool(flags and flags & WRITE_FLAGS)
    return event in CHANGES


def watch(kill_at: int | None, events: list[str]) -> None:
    def hook(event: str, args: tuple) -> None:
        if not _is_change(event, args):
            return
        events.append(event)
        if kill_at is not None and len(events) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def job_save(work: Path, start) -> None:

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import tiny_llama

    import hfcompress
    from hfcompress.io import save_compressed

    model = tiny_llama()
    hfcompress.compress(model, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]})
    start()
    save_compressed(model, work / "out", overwrite=True)


def job_export(work: Path, start) -> None:
    from hfcompress.export import export_model

    start()
    export_model(work / "source", "compressed-tensors", work / "out", overwrite=True)


def job_gptq(work: Path, start) -> None:
    from hfcompress.cli import main

    start()
    code = main(["--quiet", "compress", str(work / "tiny"), "--recipe", str(work / "gptq.yaml"), "--output", str(work / "out"),
                 "--calibration-data", str(work / "windows.safetensors"), "--no-eval", "--resume", "--overwrite"])
    if code:
        raise SystemExit(code)


JOBS = {"save": job_save, "export": job_export, "gptq": job_gptq}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=JOBS)
    parser.add_argument("work", type=Path)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--events", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    events: list[str] = []
    JOBS[args.job](args.work, lambda: watch(args.kill_at, events))
    if args.events:
        args.events.write_text(json.dumps(events))


if __name__ == "__main__":
    main()
