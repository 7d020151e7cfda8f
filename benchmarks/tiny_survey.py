"""Survey: does every causal-LM model type build and run as a tiny random model?

Runs :func:`hfcompress.testing.probe` (and the layer-pattern check
:func:`hfcompress.testing.layer_coverage`) for each type in a forked child process with a timeout,
so that one type that hangs or crashes cannot stop the run, prints a table and optionally writes
JSON::

    python benchmarks/tiny_survey.py --json /tmp/tiny_survey.json
    python benchmarks/tiny_survey.py --types llama,jamba,gemma3_text
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import torch

from hfcompress.testing import causal_lm_types, layer_coverage, probe


def _child(model_type: str, conn) -> None:
    """Probe one type in a child process and send the result back through ``conn``."""
    # Two children share the machine's cores; more threads each would only contend.
    torch.set_num_threads(1)
    result = probe(model_type)
    result["coverage"] = None
    if result["ok"]:
        try:
            result["coverage"] = layer_coverage(model_type)
        except Exception as error:  # the coverage check is informative; report, do not fail the type
            result["coverage"] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
    conn.send(result)
    conn.close()


def survey(types: list[str], timeout: float = 120.0, jobs: int = 2) -> list[dict]:
    """Probe ``types``, ``jobs`` at a time, each in its own forked process killed after ``timeout`` s."""
    # Fork: the children inherit the imported torch/transformers, so each starts in milliseconds.
    ctx = mp.get_context("fork")
    pending = list(types)
    running: dict[str, tuple] = {}
    results: dict[str, dict] = {}
    while pending or running:
        while pending and len(running) < jobs:
            model_type = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(model_type, child), daemon=True)
            proc.start()
            child.close()
            running[model_type] = (proc, parent, time.monotonic())
        for model_type, (proc, conn, started) in list(running.items()):
            result = None
            if conn.poll():
                try:
                    result = conn.recv()
                except EOFError:
                    result = None
            elif proc.is_alive() and time.monotonic() - started < timeout:
                continue
            proc.join(timeout=5 if result is not None else 0)
            if proc.is_alive():
                proc.kill()
                proc.join()
            if result is None:
                elapsed = round(time.monotonic() - started, 1)
                why = f"timed out after {timeout:.0f} s" if elapsed >= timeout else f"child died (exit {proc.exitcode})"
                result = {"type": model_type, "class": None, "ok": False, "error": why, "params": 0,
                          "seconds": elapsed, "coverage": None}
            results[model_type] = result
            del running[model_type]
            _print_row(result)
        time.sleep(0.05)
    return [results[t] for t in types]


def _coverage_text(coverage) -> str:
    if not coverage:
        return "-"
    if "error" in coverage:
        return "err"
    missing = coverage["missing"]
    return f"{coverage['layers']}/{coverage['reference_layers']}" + (f" MISSING {missing}" if missing else "")


def _print_row(r: dict) -> None:
    status = "ok" if r["ok"] else "FAIL"
    coverage = _coverage_text(r.get("coverage"))
    line = f"{r['type']:<28} {status:<5} {r['params']:>10,} {r['seconds']:>7.2f}s  {coverage:<18}"
    if r["error"]:
        line += f" {r['error'][:150]}"
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: all causal-LM types)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per type")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)

    types = args.types.split(",") if args.types else causal_lm_types()
    unknown = sorted(set(types) - set(causal_lm_types()))
    if unknown:
        parser.error(f"not causal-LM model types: {', '.join(unknown)}")
    print(f"{'type':<28} {'':<5} {'params':>10} {'time':>8}  {'layers/default':<18} error", flush=True)
    start = time.monotonic()
    results = survey(types, timeout=args.timeout, jobs=args.jobs)
    ok = sum(r["ok"] for r in results)
    short = [r["type"] for r in results if r["ok"] and (r.get("coverage") or {}).get("missing")]
    print(f"\n{ok}/{len(results)} build and run; {time.monotonic() - start:.0f} s")
    if short:
        print(f"missing layer kinds: {', '.join(short)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
