"""A quick sweep of quantization recipes on SmolLM2: each calibrated on the same Austen windows and
evaluated on the first ``--eval-windows`` WikiText-2 windows, one line of JSON per recipe.

For choosing what to try: a recipe that does well here goes into the side-by-side run
(``gptq_vs_llmcompressor.py --recipe NAME=RECIPE``), which quantizes each tool in a process of
its own and evaluates the whole split. Here everything runs in this process, one recipe after
the other (compression seconds and peak memory are this process's, so only the first recipe's
peak memory is its own).

    python benchmarks/recipe_sweep.py --eval-windows 40 \\
        --recipe gptq=w4g64-gptq --recipe awq-gptq='{"stages": [{"quantize": {"method": "gptq", "awq": true}}]}'

A recipe is a bundled name, a YAML file or inline JSON; ``none`` evaluates the unquantized model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, named_recipes, prepare_checkpoint, save_windows  # noqa: E402


def parse_args():
    parser = base_parser(__doc__, "recipe-sweep")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--recipe", action="append", required=True, metavar="NAME=RECIPE")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 2048 tokens (seed 0)")
    parser.add_argument("--jsonl", type=Path, help="append each recipe's line here too")
    parser.add_argument("--save", type=Path, help="save each compressed model to SAVE/NAME (for a later look)")
    args = parser.parse_args()
    args.recipe = named_recipes(parser, args.recipe)
    return args


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import hfcompress
    from hfcompress.data import tokenize
    from hfcompress.evaluation import evaluate_perplexity
    from transformers import AutoModelForCausalLM

    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows = save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0, args.work / "windows.safetensors")
    wiki = tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")
    for name, recipe in args.recipe.items():
        recipe = json.loads(recipe) if recipe.lstrip().startswith("{") else recipe
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        start = time.perf_counter()
        if recipe != "none":
            hfcompress.compress(model, recipe, calibration_data=windows)
        seconds = time.perf_counter() - start
        ppl = evaluate_perplexity(model.eval(), tokenizer, wiki, seq_len=2048, max_windows=args.eval_windows).perplexity
        row = {"name": name, "recipe": recipe, "eval_windows": args.eval_windows or "all", "wikitext2_ppl": round(ppl, 3),
               "compress_seconds": round(seconds, 1),
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
        print(json.dumps(row), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        if args.save:  # after the measurement, which it must not touch
            model.save_pretrained(args.save / name)


if __name__ == "__main__":
    main()
