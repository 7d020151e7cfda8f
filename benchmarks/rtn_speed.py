"""Data-free quantization at memory speed: RTN + packing of SmolLM2 inside ``compress``.

Each repeat loads the float32 SmolLM2 afresh and times ``hfcompress.compress(model, RECIPE)``
(everything the call does: the recipe, the finiteness checks around the stage, rounding every
linear layer and packing it), and, with a hook on the stage, the quantize stage alone. Prints one
line of JSON: median/min/max seconds over the repeats and weights per second.

    python benchmarks/rtn_speed.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH_HOME, prepare_checkpoint  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="w4g64-rtn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=BENCH_HOME / "rtn-speed")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress
    import hfcompress.pipeline as pipeline

    checkpoint, _ = prepare_checkpoint(args.work)
    stage_seconds: list[float] = []
    original = pipeline.STAGE_RUNNERS["quantize"]

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            stage_seconds.append(time.perf_counter() - start)

    pipeline.STAGE_RUNNERS["quantize"] = timed
    totals, weights = [], 0
    for _ in range(args.repeats):
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        weights = sum(m.weight.numel() for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
        start = time.perf_counter()
        hfcompress.compress(model, args.recipe)
        totals.append(time.perf_counter() - start)
        del model

    def summary(values):
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}

    print(json.dumps({
        "recipe": args.recipe, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "linear_weights": weights, "compress_seconds": summary(totals), "quantize_stage_seconds": summary(stage_seconds),
        "weights_per_second_compress": round(weights / statistics.median(totals)),
        "weights_per_second_stage": round(weights / statistics.median(stage_seconds)),
    }))


if __name__ == "__main__":
    main()
