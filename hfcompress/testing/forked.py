"""Run one function per item in forked child processes, a few at a time, each with a timeout.

Surveys over every model type use it so that one type that hangs, or kills its process
(a segfault, the out-of-memory killer), cannot stop the run: it becomes a result row like any
other.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Callable, Iterable

import torch

__all__ = ["run_forked"]


def _child(fn: Callable[[Any], dict], item, conn) -> None:
    # Children share the machine's cores; more threads each would only contend.
    torch.set_num_threads(1)
    conn.send(fn(item))
    conn.close()


def run_forked(fn: Callable[[Any], dict], items: Iterable, *, timeout: float, jobs: int,
               failed: Callable[[Any, str, float], dict],
               on_result: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """``[fn(item) for item in items]``, each call in a forked process killed after ``timeout`` s.

    A child that dies or times out gives ``failed(item, why, seconds)`` instead. ``on_result`` sees
    every row as it arrives (to print progress). Rows come back in the order of ``items``.
    """
    # Fork: the children inherit the imported torch/transformers, so each starts in milliseconds.
    ctx = mp.get_context("fork")
    items = list(items)
    pending = list(range(len(items)))
    running: dict[int, tuple] = {}
    results: dict[int, dict] = {}
    while pending or running:
        while pending and len(running) < jobs:
            index = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, items[index], child), daemon=True)
            proc.start()
            child.close()
            running[index] = (proc, parent, time.monotonic())
        for index, (proc, conn, started) in list(running.items()):
            row = None
            if conn.poll():
                try:
                    row = conn.recv()
                except EOFError:
                    row = None
            elif proc.is_alive() and time.monotonic() - started < timeout:
                continue
            proc.join(timeout=5 if row is not None else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            if row is None:
                elapsed = round(time.monotonic() - started, 1)
                why = f"timed out after {timeout:.0f} s" if elapsed >= timeout else f"child died (exit {proc.exitcode})"
                row = failed(items[index], why, elapsed)
            results[index] = row
            del running[index]
            on_result(row)
        time.sleep(0.05)
    return [results[i] for i in range(len(items))]


def survey_parser(description: str, timeout: float):
    """The arguments every per-model-type survey takes: which types, JSON output, timeout, jobs."""
    import argparse
    import os

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--types", help="comma-separated model types (default: all causal-LM types)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per run")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    return parser


def survey_types(parser, args) -> list[str]:
    """The types asked for (all causal-LM types by default); an unknown one is a usage error."""
    from .tiny import causal_lm_types

    known = causal_lm_types()
    types = args.types.split(",") if args.types else known
    unknown = sorted(set(types) - set(known))
    if unknown:
        parser.error(f"not causal-LM model types: {', '.join(unknown)}")
    return types
