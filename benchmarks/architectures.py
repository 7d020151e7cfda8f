"""Every causal-LM model type through GPTQ and RTN: tiny model, quantize, save, reload, compare.

For each type that the installed transformers registers, :func:`hfcompress.testing.quantize_roundtrip`
builds a tiny random model, quantizes it 4-bit (group 32) on random token windows, saves it,
reloads it with plain ``from_pretrained`` and compares logits. Each type runs in a forked child
with a timeout. Prints a table, and writes JSON and a markdown table when asked::

    python benchmarks/architectures.py --json architectures.json --markdown architectures.md
    python benchmarks/architectures.py --types llama,mixtral,jamba --methods gptq
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

os.environ.setdefault("TQDM_DISABLE", "1")  # hundreds of progress bars would bury the table

from hfcompress.testing.forked import run_forked, survey_parser, survey_types
from hfcompress.testing.roundtrip import RECIPES, quantize_roundtrip

STATES = ("ok", "refused", "partial", "crash", "unbuildable")


def _run(item: tuple[str, str]) -> dict:
    return quantize_roundtrip(*item)


def _died(item: tuple[str, str], why: str, seconds: float) -> dict:
    model_type, method = item
    return {"type": model_type, "method": method, "status": "crash", "error": why, "float_share": None,
            "max_diff": None, "seconds": seconds}


def _print_row(row: dict) -> None:
    share = "-" if row["float_share"] is None else f"{row['float_share']:.1%}"
    print(f"{row['type']:<30} {row['method']:<5} {row['status']:<11} {share:>6} {row['seconds']:>7.1f}s  "
          f"{(row['error'] or '')[:160]}", flush=True)


def summary(rows: list[dict], method: str) -> dict:
    """Counts per state, and the share of buildable types that are ok."""
    mine = [r for r in rows if r["method"] == method]
    counts = Counter(r["status"] for r in mine)
    buildable = len(mine) - counts["unbuildable"]
    return {"types": len(mine), "buildable": buildable, **{s: counts[s] for s in STATES},
            "ok_share": round(counts["ok"] / buildable, 4) if buildable else None}


def markdown(rows: list[dict], methods: list[str]) -> str:
    """The table for benchmarks/README.md and the closing note: a line per type, a column per method."""
    lines = ["| summary | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    sums = {m: summary(rows, m) for m in methods}
    for key in ("buildable", "ok", "refused", "partial", "crash", "unbuildable"):
        lines.append(f"| {key} | " + " | ".join(str(sums[m][key]) for m in methods) + " |")
    lines.append("| ok / buildable | " + " | ".join(
        f"{sums[m]['ok']}/{sums[m]['buildable']} ({sums[m]['ok'] / max(sums[m]['buildable'], 1) * 100:.1f}%)"
        for m in methods) + " |")
    lines += ["", "| type | " + " | ".join(methods) + " | note |", "|---|" + "---|" * (len(methods) + 1)]
    by_type: dict[str, dict] = {}
    for row in rows:
        by_type.setdefault(row["type"], {})[row["method"]] = row
    for model_type, per in sorted(by_type.items()):
        cells = []
        for m in methods:
            row = per.get(m)
            share = "" if row is None or row["float_share"] is None else f" ({row['float_share']:.0%} float)"
            cells.append("-" if row is None else row["status"] + share)
        notes = sorted({(r["error"] or "").replace("|", "/")[:140] for r in per.values() if r["status"] != "ok"})
        lines.append(f"| {model_type} | " + " | ".join(cells) + " | " + "; ".join(n for n in notes if n) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = survey_parser(__doc__.splitlines()[0], timeout=300.0)
    parser.add_argument("--methods", default="gptq,rtn", help="comma-separated, of: " + ", ".join(RECIPES))
    parser.add_argument("--markdown", help="write the summary and per-type table to this markdown file")
    args = parser.parse_args(argv)
    types = survey_types(parser, args)
    methods = args.methods.split(",")
    if set(methods) - set(RECIPES):
        parser.error(f"methods are among: {', '.join(RECIPES)}")
    start = time.monotonic()
    items = [(t, m) for t in types for m in methods]
    rows = run_forked(_run, items, timeout=args.timeout, jobs=args.jobs, failed=_died, on_result=_print_row)
    print(f"\n{time.monotonic() - start:.0f} s")
    for m in methods:
        print(m, json.dumps(summary(rows, m)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": {m: summary(rows, m) for m in methods}, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, methods))
    return 0 if all(r["status"] in ("ok", "refused", "unbuildable") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
