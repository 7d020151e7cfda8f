"""Survey: does every causal-LM model type build and run as a tiny random model?

Runs :func:`hfcompress.testing.probe` (and the layer-pattern check
:func:`hfcompress.testing.layer_coverage`) for each type in a forked child process with a timeout,
so that one type that hangs or crashes cannot stop the run, prints a table and optionally writes
JSON::

    python benchmarks/tiny_survey.py --json /tmp/tiny_survey.json
    python benchmarks/tiny_survey.py --types llama,jamba,gemma3_text
"""

from __future__ import annotations

import json
import sys
import time

from hfcompress.testing import layer_coverage, probe
from hfcompress.testing.forked import run_forked, survey_parser, survey_types


def _probe_with_coverage(model_type: str) -> dict:
    """Probe one type, and where it runs, check its tiny layers cover every kind of the default."""
    result = probe(model_type)
    result["coverage"] = None
    if result["ok"]:
        try:
            result["coverage"] = layer_coverage(model_type)
        except Exception as error:  # the coverage check is informative; report, do not fail the type
            result["coverage"] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
    return result


def _died(model_type: str, why: str, seconds: float) -> dict:
    return {"type": model_type, "class": None, "ok": False, "error": why, "params": 0, "seconds": seconds,
            "coverage": None}


def survey(types: list[str], timeout: float = 120.0, jobs: int = 2) -> list[dict]:
    """Probe ``types``, ``jobs`` at a time, each in its own forked process killed after ``timeout`` s."""
    return run_forked(_probe_with_coverage, types, timeout=timeout, jobs=jobs, failed=_died, on_result=_print_row)


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
    parser = survey_parser(__doc__.splitlines()[0], timeout=120.0)
    args = parser.parse_args(argv)
    types = survey_types(parser, args)
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
