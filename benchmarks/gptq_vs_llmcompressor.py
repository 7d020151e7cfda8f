"""GPTQ side by side: hfcompress against llm-compressor, with the data-free baselines.

One run, one machine, one checkpoint, one set of calibration windows, one evaluation code:

1. The bundled SmolLM2-135M-Instruct is written once as a float32 safetensors folder; both tools
   load that folder. 32 calibration windows of 2048 tokens are drawn from the Austen novels
   (seed 0, or `--seed`) and saved to a file that both tools read as is.
2. hfcompress (`hfcompress compress ... --calibration-data windows.safetensors`) and
   llm-compressor (its own virtual environment, `benchmarks/peers/`) quantize to 4-bit, group 64,
   symmetric, static act-order, each in its own process: wall time (load + quantize + save) and
   peak resident memory (wait4) of that process.
3. Every model is evaluated here with `hfcompress.evaluate_perplexity` on WikiText-2 raw test
   (2048-token non-overlapping windows, the whole split unless --eval-windows): the unquantized
   model, both GPTQ outputs (llm-compressor's through transformers + compressed-tensors), our RTN,
   and bitsandbytes NF4 (blocks of 64) and int8 (LLM.int8), which quantize on the fly.

    pip install -e ".[test,bnb]" && bash benchmarks/peers/setup_llmcompressor.sh
    python benchmarks/gptq_vs_llmcompressor.py --json gptq.json

Prints JSON (and writes it with --json). Takes about an hour on 2 CPU cores, mostly evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from common import (
    BENCH_HOME,
    REPO,
    folder_bytes,
    measure,
    named_recipes,
    prepare_checkpoint,
    python,
    save_windows,
    weights_bytes,
    write_json,
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=BENCH_HOME / "gptq-run", help="scratch folder")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn from austen/")
    parser.add_argument("--eval-windows", type=int, help="evaluate only the first N WikiText-2 windows")
    parser.add_argument("--extra-eval", type=Path, action="append", default=[],
                        help="another text to evaluate GPTQ and RTN on (first --extra-windows windows)")
    parser.add_argument("--extra-windows", type=int, default=20)
    parser.add_argument("--skip-peer", action="store_true", help="do not run llm-compressor")
    parser.add_argument("--skip-bnb", action="store_true", help="do not run the bitsandbytes baselines")
    parser.add_argument("--skip-int8", action="store_true", help="run bitsandbytes NF4 but not LLM.int8()")
    parser.add_argument("--skip-peer-eval", action="store_true",
                        help="time llm-compressor's quantization but do not evaluate its model (saves ~13 minutes)")
    parser.add_argument("--skip-rtn", action="store_true", help="do not evaluate our RTN baseline")
    parser.add_argument("--skip-gptq", action="store_true",
                        help="run only the --recipe rows of ours, not this run's plain GPTQ recipe")
    parser.add_argument("--mse", action="store_true", help="our GPTQ searches each group's clipping range")
    parser.add_argument("--skip-unquantized", action="store_true",
                        help="do not evaluate the unquantized model (another run already did)")
    parser.add_argument("--recipe", action="append", default=[], metavar="NAME=RECIPE",
                        help="also run this hfcompress recipe (a bundled name or a YAML file) the same way, as row NAME")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.recipe = named_recipes(parser, args.recipe)
    return args


def our_recipe(args, path: Path) -> Path:
    path.write_text(
        "calibration: {compute_dtype: bfloat16}\n"
        "stages:\n"
        f"  - quantize: {{method: gptq, bits: {args.bits}, group_size: {args.group_size}, sym: true, "
        f"act_order: true, static_groups: true, mse: {'true' if args.mse else 'false'}}}\n"
    )
    return path


def run_ours(args, checkpoint: Path, windows: Path, recipe: str | None = None, name: str = "gptq") -> dict:
    """Our CLI on ``recipe`` (default: the GPTQ recipe of this run) in its own process."""
    out = args.work / f"hfcompress-{name}"
    recipe = recipe or str(our_recipe(args, args.work / "recipe.yaml"))
    cmd = [python(), "-m", "hfcompress.cli", "compress", str(checkpoint), "--recipe", recipe, "--output", str(out),
           "--calibration-data", str(windows), "--dtype", "float32", "--no-eval", "--overwrite"]
    result = measure(cmd, args.work / f"hfcompress-{name}.log")
    return {**result, "recipe": recipe, "folder": str(out), "output_bytes": folder_bytes(out),
            "weights_bytes": weights_bytes(out)}


def run_peer(args, checkpoint: Path, windows: Path) -> dict:
    venv_python = BENCH_HOME / "llmcompressor-venv" / "bin" / "python"
    if not venv_python.exists():
        measure(["bash", str(REPO / "benchmarks" / "peers" / "setup_llmcompressor.sh")], args.work / "setup-llmc.log")
    out = args.work / "llmcompressor-gptq"
    report = args.work / "llmcompressor.json"
    cmd = [str(venv_python), str(REPO / "benchmarks" / "peers" / "llmcompressor_gptq.py"), "--model", str(checkpoint),
           "--windows", str(windows), "--output", str(out), "--json", str(report), "--bits", str(args.bits),
           "--group-size", str(args.group_size), "--damp", "0.01", "--actorder", "static"]
    result = measure(cmd, args.work / "llmcompressor.log")
    peer = json.loads(report.read_text())
    return {**result, "folder": str(out), "output_bytes": folder_bytes(out), "weights_bytes": weights_bytes(out),
            "versions": peer.get("versions"), "quantize_seconds_inside": peer.get("quantize_seconds")}


def evaluate(model, tokenizer, data, windows):
    from hfcompress import evaluate_perplexity

    return round(evaluate_perplexity(model, tokenizer, data, seq_len=2048, max_windows=windows).perplexity, 3)


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForCausalLM

    import hfcompress

    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows_file = args.work / ("calibration-windows.safetensors" if args.seed == 0
                                else f"calibration-windows-seed{args.seed}.safetensors")
    save_windows(tokenizer, args.data / "austen", args.samples, args.seq_len, args.seed, windows_file)
    wiki = hfcompress.evaluation.tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")
    extra = {p.name: hfcompress.evaluation.tokenize(tokenizer, p) for p in args.extra_eval}
    results: dict = {"protocol": {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, float32)", "bits": args.bits, "group_size": args.group_size,
        "sym": True, "act_order": "static",
        "calibration": f"{args.samples} x {args.seq_len} tokens of austen/, seed {args.seed}",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads()}, "models": {}}

    # 1. Quantization, each tool alone in its own process (nothing else runs meanwhile).
    if not args.skip_gptq:
        results["models"]["hfcompress_gptq"] = run_ours(args, checkpoint, windows_file)
    extras = args.recipe
    for name, recipe in extras.items():
        results["models"][f"hfcompress_{name}"] = run_ours(args, checkpoint, windows_file, recipe, name)
    if not args.skip_peer:
        results["models"]["llmcompressor_gptq"] = run_peer(args, checkpoint, windows_file)
    if not args.skip_peer and not args.skip_gptq:
        ours, peer = results["models"]["hfcompress_gptq"], results["models"]["llmcompressor_gptq"]
        results["ratios"] = {"time_hfcompress_over_llmcompressor": round(ours["seconds"] / peer["seconds"], 3),
                             "peak_rss_hfcompress_over_llmcompressor":
                                 round(ours["peak_rss_bytes"] / peer["peak_rss_bytes"], 3)}

    # 2. Evaluation, one model at a time, with the same code.
    def record(name, model, extra_texts=False, **info):
        entry = results["models"].setdefault(name, {})
        entry.update(info)
        entry["wikitext2_ppl"] = evaluate(model, tokenizer, wiki, args.eval_windows)
        if extra_texts:
            entry["extra_ppl"] = {k: evaluate(model, tokenizer, ids, args.extra_windows) for k, ids in extra.items()}
        print(json.dumps({name: entry}), flush=True)

    if not args.skip_unquantized:
        record("unquantized", AutoModelForCausalLM.from_pretrained(checkpoint), extra_texts=True,
               weights_bytes=(checkpoint / "model.safetensors").stat().st_size)
    if not args.skip_gptq:
        record("hfcompress_gptq", AutoModelForCausalLM.from_pretrained(results["models"]["hfcompress_gptq"]["folder"]),
               extra_texts=True)
    for name in extras:
        record(f"hfcompress_{name}", AutoModelForCausalLM.from_pretrained(results["models"][f"hfcompress_{name}"]["folder"]),
               extra_texts=True)
    if not args.skip_peer and not args.skip_peer_eval:
        record("llmcompressor_gptq",
               AutoModelForCausalLM.from_pretrained(results["models"]["llmcompressor_gptq"]["folder"]), extra_texts=True)
    if not args.skip_rtn:
        start = time.perf_counter()
        rtn = hfcompress.compress(AutoModelForCausalLM.from_pretrained(checkpoint), {"stages": [{"quantize": {
            "method": "rtn", "bits": args.bits, "group_size": args.group_size, "sym": True}}]})
        rtn_seconds = time.perf_counter() - start
        rtn.save_pretrained(args.work / "hfcompress-rtn")
        record("hfcompress_rtn", rtn, extra_texts=True, quantize_seconds=round(rtn_seconds, 1),
               weights_bytes=weights_bytes(args.work / "hfcompress-rtn"))
        del rtn
    if not args.skip_bnb:
        from transformers import BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        record("bitsandbytes_nf4", AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=nf4),
               note="blocks of 64 (bitsandbytes' fixed 4-bit block size), quantized on the fly")
        if not args.skip_int8:
            int8 = BitsAndBytesConfig(load_in_8bit=True)
            record("bitsandbytes_int8", AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=int8),
                   note="LLM.int8(), quantized on the fly")

    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
