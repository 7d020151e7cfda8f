"""GPTQ w4g64 on SmolLM2, without and with a 4-bit tied embedding table, in one run.

A: the recipe of ``gptq_vs_llmcompressor.py`` ("ours": GPTQ 4-bit, group 64, symmetric, static
act-order, no MSE search, bfloat16 calibration). B: the same plus ``embeddings: {bits: 4,
group_size: 64}``; SmolLM2's embeddings are tied, so the packed table also serves as lm_head.

1. The bundled SmolLM2-135M-Instruct is written once as a float32 safetensors folder, and 32
   calibration windows of 2048 tokens are drawn from the Austen novels (seed 0) into a file,
   exactly as ``gptq_vs_llmcompressor.py`` does.
2. A and B are each quantized by ``hfcompress compress ... --calibration-data windows.safetensors
   --dtype float32 --no-eval`` in its own process: wall time (load + quantize + save), peak
   resident memory (wait4), and the load average before and after (to judge a shared machine).
3. Each folder is summarized as ``hfcompress inspect`` does (bits per weight, float share, tensor
   bytes), reloaded with ``from_pretrained`` (float32) and evaluated with
   ``hfcompress.evaluate_perplexity`` on WikiText-2 raw test (2048-token windows, the whole split
   unless --eval-windows).
4. B round trip: recipe B applied here with ``hfcompress.compress`` (same windows), logits on the
   first --check-windows WikiText-2 windows of --check-len tokens, saved, reloaded: are the
   reloaded logits bit-identical (``torch.equal``)? Also: are they identical to the CLI's folder?

    python benchmarks/embeddings.py --json embeddings.json
    python benchmarks/embeddings.py --method rtn --json embeddings-rtn.json   # linears by RTN

Prints each result as it is known, then the whole JSON. Takes about 40 minutes on 2 CPU cores,
mostly evaluation (about 12 minutes per model for the whole split).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, base_parser, measure, prepare_checkpoint, python, save_windows, write_json  # noqa: E402

logger = logging.getLogger("embeddings")


def parse_args():
    parser = base_parser(__doc__, "embeddings-run")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--check-windows", type=int, default=2, help="WikiText-2 windows for the round-trip logits")
    parser.add_argument("--check-len", type=int, default=2048, help="tokens per round-trip window")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="how the linear layers are quantized")
    return parser.parse_args()


def recipe(embeddings: bool, method: str = "gptq") -> dict:
    quantize = {"method": "gptq", "bits": 4, "group_size": 64, "sym": True, "act_order": True,
                "static_groups": True, "mse": False}
    if method == "rtn":  # the same grid, rounded to nearest: minutes instead of an hour on 2 cores
        quantize = {"method": "rtn", "bits": 4, "group_size": 64, "sym": True}
    if embeddings:
        quantize["embeddings"] = {"bits": 4, "group_size": 64}
    return {"calibration": {"compute_dtype": "bfloat16"}, "stages": [{"quantize": quantize}]}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_cli(work: Path, name: str, recipe_dict: dict, checkpoint: Path, windows: Path) -> dict:
    recipe_path, out = work / f"{name}.yaml", work / name
    recipe_path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    cmd = [python(), "-m", "hfcompress.cli", "compress", str(checkpoint), "--recipe", str(recipe_path),
           "--output", str(out), "--calibration-data", str(windows), "--dtype", "float32", "--no-eval", "--overwrite"]
    entry = {"recipe": recipe_dict, "folder": str(out), "loadavg_before": loadavg()}
    try:
        entry.update(measure(cmd, work / f"{name}.log"))
    except RuntimeError as error:  # keep going: the log's traceback goes into the JSON
        entry["error"] = f"{error}\n{(work / f'{name}.log').read_text()[-6000:]}"
    entry["loadavg_after"] = loadavg()
    return entry


def inspect(folder: str) -> dict:
    from hfcompress.report import summarize_folder

    s = summarize_folder(folder)
    return {"bits_per_weight": s["bits_per_weight"], "float_share": s["float_share"],
            "tensor_bytes": s["tensor_bytes"], "file_bytes": s["file_bytes"],
            "by_type": {k: {"params": v["params"], "bytes": v["bytes"], "bits_per_weight": v["bits_per_weight"]}
                        for k, v in s["by_type"].items()}}


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("hfcompress").setLevel(logging.WARNING)
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.data import tokenize
    from hfcompress.evaluation import evaluate_perplexity

    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows_file = args.work / "calibration-windows.safetensors"
    windows = save_windows(tokenizer, args.data / "austen", args.samples, args.seq_len, 0, windows_file)
    wiki = tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    results: dict = {"protocol": {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "calibration": f"{args.samples} x {args.seq_len} tokens of austen/, seed 0",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads(), "git_head": git("rev-parse", "HEAD"),
        "hfcompress_uncommitted": git("status", "--short", "--", "hfcompress").splitlines()}, "models": {}}

    def report(name: str, **info) -> None:
        results["models"].setdefault(name, {}).update(info)
        print(json.dumps({name: info}), flush=True)
        if args.json:
            write_json(args.json, results)

    # 1. Quantization, each in its own measured process.
    names = {f"A_{args.method}": recipe(False, args.method), f"B_{args.method}_embeddings4": recipe(True, args.method)}
    b_name = f"B_{args.method}_embeddings4"
    for name, r in names.items():
        logger.info("quantizing %s", name)
        report(name, **run_cli(args.work, name, r, checkpoint, windows_file))

    # 2. Summary and perplexity of each folder, reloaded.
    for name in names:
        entry = results["models"][name]
        if "error" in entry:
            continue
        report(name, inspect=inspect(entry["folder"]))
        logger.info("evaluating %s", name)
        model = AutoModelForCausalLM.from_pretrained(entry["folder"])
        start = time.perf_counter()
        ppl = evaluate_perplexity(model, tokenizer, wiki, seq_len=2048, max_windows=args.eval_windows).perplexity
        report(name, wikitext2_ppl=round(ppl, 3), eval_seconds=round(time.perf_counter() - start, 1))
        del model

    # 3. B in this process: compress, logits, save, reload, logits again.
    logger.info("round trip of recipe B in this process")
    ids = wiki[: args.check_windows * args.check_len].reshape(args.check_windows, args.check_len)
    check: dict = {"windows": list(ids.shape)}
    try:
        model = hfcompress.compress(AutoModelForCausalLM.from_pretrained(checkpoint), names[b_name],
                                    calibration_data=windows)
        before = logits(model, ids)
        folder = args.work / "B_roundtrip"
        model.save_pretrained(folder)
        del model
        after = logits(AutoModelForCausalLM.from_pretrained(folder), ids)
        check["identical_after_reload"] = bool(torch.equal(before, after))
        check["max_abs_diff_after_reload"] = (before - after).abs().max().item()
        cli = results["models"][b_name]
        if "error" not in cli:
            check["identical_to_cli_folder"] = bool(torch.equal(after, logits(
                AutoModelForCausalLM.from_pretrained(cli["folder"]), ids)))
    except Exception:
        import traceback

        check["error"] = traceback.format_exc()
    report(b_name, roundtrip=check)

    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
