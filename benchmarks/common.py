"""Shared helpers for the side-by-side benchmarks: measured subprocesses, the shared checkpoint,
calibration windows, and evaluation with hfcompress's own perplexity code for every model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = Path(os.environ.get("HFCOMPRESS_BENCH_HOME", Path.home() / ".cache" / "hfcompress-bench"))


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds and the peak resident memory of that process (wait4)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with exit code {code}; see {log}")
    return {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in a folder's safetensors files, from their headers."""
    from hfcompress.report import tensor_nbytes

    return tensor_nbytes(sorted(Path(folder).glob("*.safetensors")))


def prepare_checkpoint(work: Path) -> tuple[Path, object]:
    """The bundled SmolLM2 as a float32 safetensors folder (what every tool loads), and its tokenizer."""
    import torch

    from hfcompress.io import load_model

    folder = work / "smollm2-float32"
    model, tokenizer, _ = load_model(None, dtype=torch.float32)
    if not (folder / "model.safetensors").exists():
        model.hf_quantizer.remove_quantization_config(model)  # GGUF dequantized to float on load
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder, tokenizer


def save_windows(tokenizer, data: Path, samples: int, seq_len: int, seed: int, path: Path):
    from safetensors.torch import save_file

    from hfcompress.calibration import calibration_windows

    windows = calibration_windows(tokenizer, data, samples, seq_len, seed)
    save_file({"input_ids": windows.contiguous()}, path)
    return windows


def base_parser(doc: str, work: str):
    """The arguments every benchmark shares: scratch folder, shared data, evaluation windows, JSON output."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=BENCH_HOME / work, help="scratch folder")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--eval-windows", type=int, help="evaluate only the first N WikiText-2 windows")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def named_recipes(parser, items: list[str]) -> dict[str, str]:
    """``--recipe NAME=RECIPE`` arguments as ``{name: recipe}`` (a malformed one is a usage error)."""
    for item in items:
        if "=" not in item:
            parser.error(f"--recipe {item!r}: expected NAME=RECIPE")
    return dict(item.split("=", 1) for item in items)


def python() -> str:
    return sys.executable


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
