"""Compress to a budget: planned mixed-precision GPTQ against uniform GPTQ on SmolLM2.

1. The sensitivity of every linear layer's options (2/3/4/8 bits, groups of 64/128) is measured
   once on Austen windows and cached (``WORK/sensitivity.safetensors``).
2. Recipes, all with the bundled w3g64-gptq settings (GPTQ, act-order with static groups, MSE
   clipping search), differing only in each layer's bits and group size:
   ``u3g64`` uniform 3-bit g64; ``plan-u3g64`` the plan at exactly u3g64's bytes; ``plan-3.5bit``
   (``--target-bits 3.5``: halfway between the sizes of u3g64 and u4g64); ``plan-3.5bpw`` (3.5 stored
   bits per weight, scales included: a fifth of the way from u3g64 to u4g64);
   ``u4g64``, ``u4g128`` uniform 4-bit; ``plan-ppl10`` what ``hfcompress plan --max-ppl-increase
   10%`` chooses (the smallest plan found whose layers, quantized together, measure within 10% of
   the unquantized perplexity on 8 held-out Austen windows, or on ``--check-data``); ``u8g64``
   uniform 8-bit; ``u2g128`` uniform 2-bit g128 (the smallest plan of formats alone);
   ``cut-u3g64`` and ``cut-u2g128`` what ``hfcompress plan --prune heads,ffn`` chooses at the bytes
   of u3g64 and u2g128 (cuts and formats together; the cuts' costs are added to the cached
   sensitivity, one forward and backward pass); ``u4g32`` uniform 4-bit g32 (a format the
   sensitivity does not price: no prediction).
3. Each is compressed by ``hfcompress compress`` (wall time, peak RSS), its safetensors bytes
   counted, and evaluated on WikiText-2 raw test (the whole split unless ``--eval-windows``) by
   ``hfcompress eval``; the unquantized model too (``float``).
4. ``--text-check``: uniform 4-bit g64 with every layer quantized at once (``PlanCheck``), its
   perplexity ratio on unseen Austen windows, on ``--check-data`` text and on the first WikiText-2
   windows, beside the summed prediction.
5. ``--correlation N``: N single-layer quantizations (random layers and options), each layer's
   measured loss increase on the first WikiText-2 windows against the two costs the sensitivity
   holds (K-FAC Fisher, the layer's own output error) and the KL divergence of the logits on the
   calibration windows; Pearson and Spearman correlations.

One JSON line per result in ``--jsonl`` as it is measured (a long run keeps what it finished)::

    python benchmarks/plan_vs_uniform.py --jsonl plan.jsonl --runs float,u3g64,plan-u3g64
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, measure, prepare_checkpoint, python, save_windows, weights_bytes  # noqa: E402

RUNS = ("float", "u3g64", "plan-u3g64", "plan-3.5bit", "plan-3.5bpw", "u4g64", "u4g128", "plan-ppl10", "u8g64",
        "cut-u3g64", "u2g128", "cut-u2g128", "u4g32")


def emit(path: Path | None, record: dict) -> None:
    print(json.dumps(record), flush=True)
    if path:
        with open(path, "a") as out:
            out.write(json.dumps(record) + "\n")


def evaluate(folder: Path | str, wiki: Path, windows: int | None, log: Path) -> dict:
    out = log.with_suffix(".json")
    cmd = [python(), "-m", "hfcompress.cli", "eval", str(folder), "--data", str(wiki), "--json", str(out)]
    if windows:
        cmd += ["--max-windows", str(windows)]
    timing = measure(cmd, log)
    return {"wikitext2_ppl": round(json.loads(out.read_text())["perplexity"], 3), "eval_seconds": timing["seconds"]}


def plans(sensitivity, runs):
    from hfcompress.planning import bytes_for_bits, plan_for_bytes, uniform_plan
    from hfcompress.planning.joint import JointMenu

    u3, u2 = uniform_plan(sensitivity, 3, 64), uniform_plan(sensitivity, 2, 128)
    chosen = {
        "u3g64": lambda: u3,
        "plan-u3g64": lambda: plan_for_bytes(sensitivity, u3.nbytes),
        "plan-3.5bit": lambda: plan_for_bytes(sensitivity, bytes_for_bits(sensitivity, 3.5, 64)),
        "plan-3.5bpw": lambda: plan_for_bytes(sensitivity, 3.5 * int(sensitivity.weights.sum()) / 8),
        "u4g64": lambda: uniform_plan(sensitivity, 4, 64),
        "u4g128": lambda: uniform_plan(sensitivity, 4, 128),
        "u8g64": lambda: uniform_plan(sensitivity, 8, 64),
        "u2g128": lambda: u2,
        # --prune heads,ffn: cuts and formats planned together, at the bytes of u3g64 and of u2g128
        # (the smallest any plan of formats alone can be)
        "cut-u3g64": lambda: plan_for_bytes(JointMenu(sensitivity), u3.nbytes),
        "cut-u2g128": lambda: plan_for_bytes(JointMenu(sensitivity), u2.nbytes),
    }
    return {name: make() for name, make in chosen.items() if name in runs}


def correlation(model, tokenizer, sensitivity, targets, windows, wiki: Path, n: int, jsonl) -> None:
    """Single-layer quantizations: measured loss increase against the predicted costs."""
    import torch
    import torch.nn.functional as F

    from hfcompress.data import tokenize
    from hfcompress.planning.sensitivity import _quantized_change
    from hfcompress.quantization.gptq import accumulate_hessian
    from hfcompress.recipe import Recipe

    stage = Recipe.load("w3g64-gptq").stages[0]
    ids = tokenize(tokenizer, wiki).flatten()[: 4 * 2048].view(4, 2048)
    calib = windows[:2]

    @torch.no_grad()
    def run(batch):
        losses, logps = [], []
        for w in batch:
            logits = model(w[None]).logits[0].float()
            losses.append(F.cross_entropy(logits[:-1], w[1:], reduction="sum").item())
            logps.append(F.log_softmax(logits, -1))
        return sum(losses) / (len(batch) * (batch.shape[1] - 1)), logps

    base_wiki, _ = run(ids)
    _, base_logps = run(calib)
    g = torch.Generator().manual_seed(0)
    picks = [(int(torch.randint(len(sensitivity.modules), (1,), generator=g)),
              int(torch.randint(len(sensitivity.options), (1,), generator=g))) for _ in range(n)]
    # The Hessians of the sampled layers over the sensitivity's windows, in one pass: the same
    # weight changes the sensitivity measured.
    hessians: dict[str, list] = {sensitivity.modules[i]: [None, 0] for i, _ in picks}

    def hook(name):
        def accumulate(module, args, output):
            x = args[0].detach()
            H, count = hessians[name]
            H = torch.zeros(x.shape[-1], x.shape[-1]) if H is None else H
            hessians[name] = list(accumulate_hessian(H, x, count))
        return accumulate

    handles = [targets[name].register_forward_hook(hook(name)) for name in hessians]
    with torch.no_grad():
        for w in windows[: sensitivity.settings["windows"][0]]:
            model(w[None])
    for handle in handles:
        handle.remove()
    rows = []
    for k, (i, j) in enumerate(picks):
        name, (bits, group) = sensitivity.modules[i], sensitivity.options[j]
        module = targets[name]
        W = module.weight.detach().float().clone()
        H = hessians[name][0]
        module.weight.data += _quantized_change(W, H, stage, bits, group).to(module.weight.dtype)
        try:
            wiki_loss, _ = run(ids)
            _, logps = run(calib)
            kl = sum(float(F.kl_div(q, p, log_target=True, reduction="sum")) for p, q in zip(base_logps, logps))
            kl /= sum(p.shape[0] for p in logps)
        finally:
            module.weight.data.copy_(W)
        row = {"correlation_sample": k, "module": name, "bits": bits, "group_size": group,
               "fisher": float(sensitivity.cost[i, j]), "output_error": float(sensitivity.output_error[i, j]),
               "kl": kl, "measured_loss_increase": wiki_loss - base_wiki}
        rows.append(row)
        emit(jsonl, row)
    measured = torch.tensor([r["measured_loss_increase"] for r in rows], dtype=torch.float64)
    summary = {"correlation": n}
    for key in ("fisher", "output_error", "kl"):
        x = torch.tensor([r[key] for r in rows], dtype=torch.float64)
        summary[f"{key}_pearson"] = round(float(torch.corrcoef(torch.stack([x, measured]))[0, 1]), 4)
        rank = lambda v: v.argsort().argsort().double()  # noqa: E731
        summary[f"{key}_spearman"] = round(float(torch.corrcoef(torch.stack([rank(x), rank(measured)]))[0, 1]), 4)
    emit(jsonl, summary)


def text_check(model, tokenizer, targets, stage, sensitivity, windows, wiki: Path, other: Path | None, jsonl) -> None:
    """Uniform 4-bit g64, every layer quantized at once (``PlanCheck``), measured on unseen Austen
    windows, on ``other`` text and on the first 4 WikiText-2 windows: how much the text matters."""
    from hfcompress.data import tokenize
    from hfcompress.planning import uniform_plan
    from hfcompress.planning.check import PlanCheck

    n = sensitivity.settings["windows"][0]
    texts = {"austen_unseen": windows[n: n + 8], "wikitext2_first4": tokenize(tokenizer, wiki).flatten()[: 4 * 2048].view(4, 2048)}
    if other:  # its first 8 windows, as for WikiText-2
        texts[other.stem] = tokenize(tokenizer, other).flatten()[: 8 * 2048].view(8, 2048)
    plan = uniform_plan(sensitivity, 4, 64)
    check = PlanCheck(model, targets, stage, windows[:n], texts["austen_unseen"])
    record = {"text_check": "u4g64", "predicted_ppl_ratio": round(plan.perplexity_ratio, 4)}
    for name, held_out in texts.items():
        check.held_out = held_out
        record[name] = round(check.ratio(plan), 4)
    emit(jsonl, record)


def main():
    parser = base_parser(__doc__, "plan")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--jsonl", type=Path, help="append one JSON line per result here")
    parser.add_argument("--sensitivity-windows", type=int, default=16)
    parser.add_argument("--check-data", type=Path,
                        help="text plan-ppl10's plans are measured on (default: 8 Austen windows after the sensitivity's)")
    parser.add_argument("--text-check", action="store_true",
                        help="uniform 4-bit g64 checked on unseen Austen, --check-data (if given) and WikiText-2 text")
    parser.add_argument("--correlation", type=int, default=0, help="single-layer samples for the correlations")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    from hfcompress.planning import Sensitivity, measure_sensitivity, plan_for_cost
    from hfcompress.planning.sensitivity import sensitivity_settings, with_prune_costs
    from hfcompress.quantization.stage import select_targets
    from hfcompress.recipe import Recipe

    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows_file = args.work / "austen-windows.safetensors"
    save_windows(tokenizer, args.data / "austen", 32, 2048, 0, windows_file)
    from safetensors.torch import load_file

    windows = load_file(windows_file)["input_ids"]
    wiki = args.data / "wikitext-2-raw" / "wiki.test.raw"
    base = Recipe.load("w3g64-gptq")
    stage = base.stages[0]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    targets = select_targets(model, stage)
    cache = args.work / "sensitivity.safetensors"
    sample = windows[: args.sensitivity_windows]
    runs = [run for run in args.runs.split(",") if run]
    sensitivity = Sensitivity.load(cache) if cache.exists() else None
    without_cuts = lambda settings: {k: v for k, v in settings.items() if k != "prune"}  # noqa: E731
    if sensitivity is None or without_cuts(sensitivity.settings) != sensitivity_settings(stage, sample):
        begin = time.perf_counter()
        sensitivity = measure_sensitivity(model, targets, sample, stage)
        sensitivity.save(cache)
        emit(args.jsonl, {"sensitivity_seconds": round(time.perf_counter() - begin, 1),
                          "layers": len(sensitivity.modules), "options": len(sensitivity.options)})
    if any(run.startswith("cut-") for run in runs) and sensitivity.prune is None:
        begin = time.perf_counter()
        sensitivity = with_prune_costs(sensitivity, model, targets, sample, ("ffn", "heads"))
        sensitivity.save(cache)
        emit(args.jsonl, {"cut_costs_seconds": round(time.perf_counter() - begin, 1)})
    if args.correlation:
        correlation(model, tokenizer, sensitivity, targets, windows, wiki, args.correlation, args.jsonl)
    if args.text_check:
        text_check(model, tokenizer, targets, stage, sensitivity, windows, wiki, args.check_data, args.jsonl)
    chosen = plans(sensitivity, runs)
    checked = {}
    if "plan-ppl10" in runs:  # what hfcompress plan --max-ppl-increase 10% does: plans measured on held-out windows
        from hfcompress.planning.check import PlanCheck, plan_within

        begin = time.perf_counter()
        if args.check_data:
            from hfcompress.calibration import calibration_windows

            held_out = calibration_windows(tokenizer, args.check_data, 8, 2048, 0)
        else:
            held_out = windows[args.sensitivity_windows: args.sensitivity_windows + 8]
        check = PlanCheck(model, targets, stage, sample, held_out)

        def measured(plan):
            ratio = check.ratio(plan)
            emit(args.jsonl, {"plan_search_step": round(plan.nbytes / 1e6, 3), "bits_per_weight": round(plan.bits_per_weight, 4),
                              "predicted_ppl_ratio": round(plan.perplexity_ratio, 4), "checked_ppl_ratio": round(ratio, 4)})
            return ratio

        chosen["plan-ppl10"], checked["plan-ppl10"] = plan_within(sensitivity, 1.10, measured)
        emit(args.jsonl, {"plan_search_seconds": round(time.perf_counter() - begin, 1),
                          "check_data": str(args.check_data or "austen held-out"),
                          "additive_plan_mb": round(plan_for_cost(sensitivity, math.log(1.10)).nbytes / 1e6, 3)})
        del check
    del model
    base_stage = {"method": "gptq", "sym": True, "act_order": True, "static_groups": True, "mse": True}
    for name in runs:
        if name == "float":
            emit(args.jsonl, {"run": "float", "weights_bytes": weights_bytes(checkpoint),
                              **evaluate(checkpoint, wiki, args.eval_windows, args.work / "float-eval.log")})
            continue
        recipe = args.work / f"{name}.yaml"
        if name not in chosen:  # a uniform format the sensitivity does not price: compressed and measured only
            bits, group_size = map(int, name[1:].split("g"))
            recipe.write_text(yaml.safe_dump({"calibration": {"samples": 32, "seq_len": 2048, "seed": 0}, "stages": [
                {"quantize": {**base_stage, "bits": bits, "group_size": group_size}}]}))
            output = args.work / name / "out"
            timing = measure([python(), "-m", "hfcompress.cli", "compress", str(checkpoint), "--recipe", str(recipe),
                              "--output", str(output), "--overwrite", "--no-eval", "--calibration-data",
                              str(windows_file)], args.work / f"{name}.log")
            emit(args.jsonl, {"run": name, "recipe": str(recipe), "weights_bytes": weights_bytes(output),
                              "compress_seconds": timing["seconds"], "mix": f"210 layers {bits}-bit g{group_size}",
                              **evaluate(output, wiki, args.eval_windows, args.work / f"{name}-eval.log")})
            continue
        plan = chosen[name]
        scores = args.work / f"{name}.prune-scores.safetensors"
        prune = plan.prune_stage(str(scores))
        if prune:  # the stage cuts the units the plan priced: the sensitivity's scores
            sensitivity.prune.scores.save(scores)
        recipe.write_text(yaml.safe_dump({"calibration": {"samples": 32, "seq_len": 2048, "seed": 0},
                                          "stages": ([{"prune": prune}] if prune else [])
                                          + [{"quantize": plan.quantize_stage(base_stage)}]}))
        output = args.work / name / "out"
        timing = measure([python(), "-m", "hfcompress.cli", "compress", str(checkpoint), "--recipe", str(recipe),
                          "--output", str(output), "--overwrite", "--no-eval", "--calibration-data",
                          str(windows_file)], args.work / f"{name}.log")
        record = {"run": name, "recipe": str(recipe), "planned_bytes": plan.nbytes, "bits_per_weight": round(plan.bits_per_weight, 4),
                  "predicted_ppl_ratio": round(plan.perplexity_ratio, 4),
                  **({"checked_ppl_ratio": round(checked[name], 4)} if name in checked else {}), "weights_bytes": weights_bytes(output),
                  "compress_seconds": timing["seconds"], "compress_peak_rss_gb": round(timing["peak_rss_bytes"] / 1e9, 3),
                  "mix": plan.describe().split("; ")[-1],
                  **({"cuts": "; ".join(plan.describe().split("; ")[2:-1])} if plan.cuts() else {})}
        record.update(evaluate(output, wiki, args.eval_windows, args.work / f"{name}-eval.log"))
        emit(args.jsonl, record)


if __name__ == "__main__":
    main()
