"""A GPTQ run killed half-way (SIGKILL) and resumed must end with the same bytes as one that ran through.

    python benchmarks/resume_kill.py [--samples 8] [--kill-after-layers 15]

Runs `hfcompress compress` on the bundled SmolLM2 (float32) three times in subprocesses: once
uninterrupted; once killed with SIGKILL as soon as its resume state records the given number of
finished layers; then the same command with --resume. Prints JSON with the SHA-256 of both
model.safetensors files and whether they are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from common import BENCH_HOME, REPO, prepare_checkpoint, python, save_windows


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=BENCH_HOME / "resume-kill")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--kill-after-layers", type=int, default=15)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows = args.work / "windows.safetensors"
    save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0, windows)

    def command(output: Path, *extra: str) -> list[str]:
        return [python(), "-m", "hfcompress.cli", "-q", "compress", str(checkpoint), "--recipe", "w4g64-gptq",
                "--calibration-data", str(windows), "--output", str(output), "--dtype", "float32", "--no-eval",
                "--overwrite", *extra]

    whole, resumed = args.work / "whole", args.work / "resumed"
    for stale in (whole, resumed, Path(f"{resumed}.resume"), Path(f"{whole}.resume")):
        shutil.rmtree(stale, ignore_errors=True)  # a previous run's state would be resumed instead
    start = time.perf_counter()
    subprocess.run(command(whole), check=True)
    whole_seconds = time.perf_counter() - start

    state = Path(f"{resumed}.resume") / "stage0" / "state.json"
    proc = subprocess.Popen(command(resumed))
    while proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["blocks_done"] >= args.kill_after_layers:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run to kill ended by itself (exit status {proc.returncode}) before "
                         f"{args.kill_after_layers} layers were done; lower --kill-after-layers")
    killed_at = json.loads(state.read_text())["blocks_done"] if state.exists() else None
    start = time.perf_counter()
    subprocess.run(command(resumed, "--resume"), check=True)
    resume_seconds = time.perf_counter() - start

    a, b = sha256(whole / "model.safetensors"), sha256(resumed / "model.safetensors")
    print(json.dumps({
        "killed_with": "SIGKILL", "killed_after_layers": killed_at, "exit_status_of_killed_run": proc.returncode,
        "uninterrupted_seconds": round(whole_seconds, 1), "resumed_run_seconds": round(resume_seconds, 1),
        "sha256_uninterrupted": a, "sha256_resumed": b, "identical": a == b,
        "config_identical": (whole / "config.json").read_text() == (resumed / "config.json").read_text(),
        "state_removed_after_success": not Path(f"{resumed}.resume").exists(),
    }, indent=2))


if __name__ == "__main__":
    main()
