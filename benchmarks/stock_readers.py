"""Our compressed-tensors saves, read by stock transformers in a virtual environment without hfcompress.

    python benchmarks/stock_readers.py --venv /work/readers/stock --json stock-readers.json
    python benchmarks/stock_readers.py --python /path/to/other/python --gptq-samples 32

1. The stock environment: ``--python`` names one; ``--venv`` names a folder, created if it holds
   no ``bin/python`` with ``python3.11 -m venv``, ``pip install torch==2.13.0`` first (the CPU
   wheel), then ``transformers==5.24.0 compressed-tensors==<the version in this environment>
   accelerate safetensors`` (torch pinned by a constraint file, so never upgraded). The run checks
   that ``hfcompress`` cannot be imported there.
2. The bundled SmolLM2-135M-Instruct (``hfcompress compress`` with no MODEL, bfloat16), compressed
   by the CLI in its own process for each recipe: w8-rtn, w4g64-rtn, w4g64-gptq (a copy of the
   bundled recipe with ``calibration.samples: --gptq-samples``; same format, fewer windows) and
   w4-rtn (group 128 does not divide SmolLM2's 576: saved in the native format). Wall time, the
   ``format:`` line and the printed summary are recorded.
3. On the first ``--tokens`` token ids of WikiText-2 raw test (the whole file tokenized, CRLF kept,
   with the folder's tokenizer): ours, ``from_pretrained(folder)`` after ``import hfcompress`` in
   this process, in its default dtype (our kernels, and the reference path) and in float32;
   theirs, ``from_pretrained(folder)`` in the stock environment (this file run there with
   ``--stock-worker``), in the folder's dtype and in float32, each plus greedy ``generate`` of 8
   new tokens. Logits and the stock reader's dequantized weights travel as ``torch.save`` files,
   read with ``torch.load(weights_only=True)``. A native folder must fail to load there, with a
   message naming hfcompress.

Prints a table and JSON: max and mean absolute logit difference and argmax agreement of the stock
model against ours (and against ours in float32), the floor (our own model in its dtype against
float32), both in float32, the share of dequantized weights equal to ours, and whether greedy
generation agrees. ``ok``: in float32 the stock logits equal ours to 1e-4 of the logit scale, and
in its dtype the stock model is no further from the float32 logits than twice our own model in its
dtype (max difference), with argmax agreement at most 2 points below; for the native save, the
stock load raises an error that names hfcompress.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
TORCH_VERSION = "2.13.0"
TRANSFORMERS_VERSION = "5.24.0"
# bundled recipe -> whether compressed-tensors is expected to hold it (on SmolLM2)
RECIPES = {"w8-rtn": True, "w4g64-rtn": True, "w4g64-gptq": True, "w4-rtn": False}


# --------------------------------------------------------------------------- the stock environment

def run_logged(cmd: list[str], log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        start = time.perf_counter()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
        out.write(f"rc={code} seconds={time.perf_counter() - start:.0f}\n")
    if code:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with exit code {code}; see {log}")


def create_venv(venv: Path) -> dict:
    """``python3.11 -m venv``; torch first, then the readers with torch held by a constraint."""
    from importlib.metadata import version

    ct_version = version("compressed-tensors")
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / f"{venv.name}-install.log"
    constraint = venv.parent / f"{venv.name}-torch-constraint.txt"
    constraint.write_text(f"torch=={TORCH_VERSION}\n")
    pip = str(venv / "bin" / "pip")
    commands = [["python3.11", "-m", "venv", str(venv)],
                [pip, "install", f"torch=={TORCH_VERSION}"],
                [pip, "install", "-c", str(constraint), f"transformers=={TRANSFORMERS_VERSION}",
                 f"compressed-tensors=={ct_version}", "accelerate", "safetensors"]]
    start = time.perf_counter()
    for cmd in commands:
        run_logged(cmd, log)
    return {"created": True, "commands": [" ".join(c) for c in commands], "log": str(log),
            "seconds": round(time.perf_counter() - start)}


PROBE = """
import importlib.util, json, sys
from importlib.metadata import version
print(json.dumps({"python": sys.version.split()[0], "executable": sys.executable,
                  "hfcompress_importable": importlib.util.find_spec("hfcompress") is not None,
                  "versions": {p: version(p) for p in ("torch", "transformers", "compressed-tensors",
                                                        "accelerate", "safetensors")}}))
"""


def stock_python(args) -> tuple[str, dict]:
    setup = {"created": False}
    if args.python:
        python = args.python
    else:
        if not (args.venv / "bin" / "python").exists():
            setup = create_venv(args.venv)
        python = str(args.venv / "bin" / "python")
    probe = json.loads(subprocess.run([python, "-c", PROBE], capture_output=True, text=True, check=True,
                                      cwd="/").stdout)
    if probe["hfcompress_importable"]:
        raise SystemExit(f"{python} can import hfcompress: not a stock environment")
    if probe["versions"]["torch"].split("+")[0] != TORCH_VERSION:
        print(f"warning: the stock environment has torch {probe['versions']['torch']}", file=sys.stderr)
    return python, {**setup, **probe}


# --------------------------------------------------------------------------- the stock side

def stock_worker(spec_path: Path) -> None:
    """Run in the stock environment: load each folder with plain transformers, in the folder's
    dtype and in float32; logits, the dequantized weights of the quantized linears, generate."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = json.loads(spec_path.read_text())
    ids = torch.load(spec["ids"], weights_only=True)["input_ids"]
    out = {}
    for name, job in spec["folders"].items():
        out[name] = {}
        for variant, dtype in (("default", None), ("float32", torch.float32)):
            record = out[name][variant] = {}
            start = time.perf_counter()
            try:
                model, info = AutoModelForCausalLM.from_pretrained(
                    job["folder"], output_loading_info=True, **({"dtype": dtype} if dtype else {}))
            except Exception as err:  # noqa: BLE001 - the error is the result for a native folder
                record.update({"loaded": False, "error": type(err).__name__, "message": str(err),
                               "message_names_hfcompress": "hfcompress" in str(err)})
                break
            model.eval()
            record["loaded"] = True
            record["load_seconds"] = round(time.perf_counter() - start, 1)
            record["loading_info"] = {k: sorted(map(str, v))[:20] for k, v in info.items()}
            record["dtype"] = str(model.dtype).removeprefix("torch.")
            qconfig = getattr(model.config, "quantization_config", None)
            qdict = qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig or {})
            record["quantization_config"] = {k: str(qdict[k]) for k in ("quant_method", "format")
                                             if k in qdict}
            with torch.no_grad():
                start = time.perf_counter()  # compressed-tensors decompresses on the first forward
                logits = model(ids).logits
                record["first_forward_seconds"] = round(time.perf_counter() - start, 2)
                torch.save({"logits": logits}, job[f"logits_{variant}"])
                quantized = {n: m.weight.detach() for n, m in model.named_modules()
                             if getattr(m, "quantization_scheme", None) is not None and hasattr(m, "weight")}
                torch.save(quantized, job[f"weights_{variant}"])
                record["quantized_linears"] = len(quantized)
                classes = {}
                for module in model.modules():
                    if isinstance(module, torch.nn.Linear) or "Compressed" in type(module).__name__:
                        key = f"{type(module).__module__}.{type(module).__name__}"
                        classes[key] = classes.get(key, 0) + 1
                record["linear_classes_after_forward"] = classes
                prompt = ids[:, : spec["prompt_tokens"]]
                start = time.perf_counter()
                generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                           min_new_tokens=8, do_sample=False)
                record["generate_seconds"] = round(time.perf_counter() - start, 2)
                record["generated_ids"] = generated[0, prompt.shape[1]:].tolist()
            del model, logits, quantized
    out["_hfcompress_imported"] = "hfcompress" in sys.modules
    Path(spec["out"]).write_text(json.dumps(out, indent=2))


# --------------------------------------------------------------------------- compress (project venv)

def hfcompress_command() -> list[str]:
    script = Path(sys.executable).parent / "hfcompress"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from hfcompress.cli import main; sys.exit(main())"]


def gptq_recipe(work: Path, samples: int) -> Path:
    """A copy of the bundled w4g64-gptq recipe with ``calibration.samples: samples``."""
    import yaml

    text = (REPO / "recipes" / "w4g64-gptq.yaml").read_text()
    if samples == 32:
        return REPO / "recipes" / "w4g64-gptq.yaml"
    new, n = re.subn(r"\bsamples: *\d+", f"samples: {samples}", text, count=1)
    if n != 1:
        raise SystemExit("recipes/w4g64-gptq.yaml: no 'samples:' to change")
    path = work / f"w4g64-gptq-samples{samples}.yaml"
    path.write_text(f"# recipes/w4g64-gptq.yaml with calibration.samples: {samples} (benchmarks/stock_readers.py)\n"
                    + new)
    assert yaml.safe_load(path.read_text())["calibration"]["samples"] == samples
    return path


def compress(name: str, recipe: str, work: Path, reuse: bool) -> dict:
    from common import measure

    output, record_path, log = work / name, work / f"{name}.compress.json", work / f"{name}.compress.log"
    if reuse and (output / "config.json").exists() and record_path.exists():
        return {**json.loads(record_path.read_text()), "reused": True}
    cmd = [*hfcompress_command(), "compress", "--recipe", recipe, "--no-eval", "--output", str(output), "--overwrite"]
    record = {"command": " ".join(["hfcompress", *cmd[len(hfcompress_command()):]]), "recipe": recipe}
    print(f"[{name}] {record['command']}", flush=True)
    try:
        record.update(measure(cmd, log))
    except RuntimeError as err:
        record["error"] = str(err)
        record["log_tail"] = log.read_text()[-3000:]
        return record
    lines = log.read_text().splitlines()
    record["format_line"] = next((line for line in lines if line.startswith("format:")), None)
    record["summary"] = [line for line in lines if re.match(r"(format|size|perplexity|saved): ", line)]
    record["format_reason"] = [line for line in lines if line.startswith(("saving in", "saved in"))]
    config = json.loads((output / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    record["config"] = {"model_type": config.get("model_type"), "quant_method": qc.get("quant_method"),
                        "format": qc.get("format"), "hfcompress_record": "hfcompress" in config}
    record_path.write_text(json.dumps(record, indent=2))
    print(f"[{name}] {record['seconds']} s; " + "; ".join(record["summary"]), flush=True)
    return record


# --------------------------------------------------------------------------- ours, and the comparison

def compare(theirs, ours) -> dict:
    theirs, ours = theirs.float(), ours.float()
    diff = (theirs - ours).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "argmax_agreement": round((theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(), 4)}


def ours(folder: Path, ids, prompt_tokens: int, stock_dtype: str | None, stock_weights: dict[str, Path]) -> dict:
    """Our loads of ``folder`` (hfcompress imported): the default dtype with our kernels and with
    the reference path (dequantize, then matmul), float32, and the stock model's dtype if it
    differs; our dequantized weights against the stock reader's."""
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress  # noqa: F401 - the reader under test
    from hfcompress.quantization import dispatch
    from hfcompress.quantization.qlinear import QuantLinear

    out = {"weights": {}}
    with torch.no_grad():
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        out["load_seconds"] = round(time.perf_counter() - start, 1)
        out["dtype"] = str(model.dtype).removeprefix("torch.")
        out["auto"] = model(ids).logits.float()
        with dispatch.use("reference"):
            out["reference"] = model(ids).logits.float()
        prompt = ids[:, :prompt_tokens]
        out["generated_ids"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                              min_new_tokens=8, do_sample=False)[0, prompt_tokens:].tolist()
        mine = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        for variant, path in stock_weights.items():
            theirs = torch.load(path, weights_only=True)
            equal = total = 0
            max_abs = max_rel = 0.0
            for name, module in mine.items():
                if name not in theirs:
                    continue
                w, t = module.dequantize_weight(), theirs[name]
                equal += (w.to(t.dtype) == t).sum().item()
                total += w.numel()
                diff = (w - t.float()).abs().max().item()
                max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / w.abs().max().item())
            out["weights"][variant] = {
                "stock_dtype": str(next(iter(theirs.values())).dtype).removeprefix("torch.") if theirs else None,
                "ours_quantized_linears": len(mine), "stock_quantized_linears": len(theirs),
                "same_modules": sorted(mine) == sorted(theirs),
                "elements_equal_in_stock_dtype": round(equal / total, 6) if total else None,
                "max_abs_diff": max_abs, "max_abs_diff_over_weight_absmax": max_rel}
            del theirs
        del model
        dtypes = {"float32"} | ({stock_dtype} if stock_dtype and stock_dtype != out["dtype"] else set())
        for dtype in sorted(dtypes):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
            with dispatch.use("reference"):
                out[dtype] = model(ids).logits.float()
                if dtype == "float32":
                    out["generated_ids_float32"] = model.generate(
                        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8,
                        do_sample=False)[0, prompt_tokens:].tolist()
                    top = out[dtype][0, prompt_tokens - 1].topk(2).values
                    out["first_token_margin_float32"] = (top[0] - top[1]).item()
            del model
    return out


def wikitext_ids(folder: Path, data: Path, tokens: int):
    """The first ``tokens`` ids of WikiText-2 raw test, tokenized whole; the file's CRLF kept."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = (data / "wikitext-2-raw" / "wiki.test.raw").read_bytes().decode("utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens")
    return ids.contiguous(), tokenizer


def table(result: dict) -> str:
    rows = ["| recipe | compress s | peak RSS | format | size |", "|---|---|---|---|---|"]
    for name, r in result["recipes"].items():
        c = r["compress"]
        if "error" in c:
            rows.append(f"| {name} | failed: {c['error']} | | | |")
            continue
        size = next((line for line in c["summary"] if line.startswith("size:")), "").removeprefix("size:").strip()
        fmt = c["format_line"].removeprefix("format:").strip().split(":")[0]
        rows.append(f"| {name} | {c['seconds']} | {c['peak_rss_bytes'] / 2**30:.2f} GiB | {fmt} | {size} |")
    rows += ["", "| recipe | stock load | stock vs ours | stock vs ours float32 | floor: ours vs ours float32 | "
             "both float32: stock vs ours | weights equal (default / float32) | generate 8: stock = ours "
             "(default / float32), stock = ours float32 | ok |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["recipes"].items():
        s = r.get("stock", {}).get("default", {})
        if not s.get("loaded"):
            load = f"raises {s.get('error')}" + (", names hfcompress" if s.get("message_names_hfcompress") else "")
            rows.append(f"| {name} | {load} | | | | | | | {r['ok']} |")
            continue

        def cell(c, mean=True):
            return f"{c['max_abs_diff']:.4g} / " + (f"{c['mean_abs_diff']:.3g}, " if mean else "") + \
                f"{c['argmax_agreement']:.2%}"

        f32 = r.get("float32_stock_vs_ours_float32")
        weights = " / ".join(f"{w['elements_equal_in_stock_dtype']:.2%}" for w in r["weights_vs_ours"].values())
        g = r["generate"]
        rows.append(f"| {name} | ok ({s['dtype']}) | {cell(r['vs_ours'])} | {cell(r['vs_ours_float32'])} | "
                    f"{cell(r['floor_ours_vs_ours_float32'])} | {cell(f32) if f32 else 'n/a'} | {weights} | "
                    f"{g['stock_vs_ours']} / {g['both_float32']}, {g['stock_vs_ours_float32']} | {r['ok']} |")
    rows.append("\nLogit cells: max abs diff / mean abs diff, argmax agreement, on the same token ids.")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock-worker", type=Path, help=argparse.SUPPRESS)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--venv", type=Path, default=Path("/work/readers/stock"),
                       help="stock virtual environment, created if missing (default: /work/readers/stock)")
    where.add_argument("--python", help="python of an existing stock environment (no hfcompress)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: $HFCOMPRESS_BENCH_HOME/stock-readers)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--tokens", type=int, default=512, help="WikiText-2 tokens to compare logits on")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for generate")
    parser.add_argument("--gptq-samples", type=int, default=32,
                        help="calibration windows for w4g64-gptq (the bundled recipe has 32; fewer: same format)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--reuse", action="store_true", help="keep compressed folders already in --work")
    parser.add_argument("--keep-tensors", action="store_true",
                        help="keep the stock logits and weights (.pt) in --work; deleted after comparing otherwise")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.stock_worker:
        return stock_worker(args.stock_worker)

    from importlib.metadata import version

    import torch

    from common import BENCH_HOME, write_json

    work = (args.work or BENCH_HOME / "stock-readers").resolve()
    work.mkdir(parents=True, exist_ok=True)
    python, env = stock_python(args)
    print(f"stock environment: {python} {json.dumps(env['versions'])}", flush=True)
    names = [n for n in args.recipes.split(",") if n]
    unknown = set(names) - set(RECIPES)
    if unknown:
        raise SystemExit(f"unknown recipes: {', '.join(sorted(unknown))}")
    recipes = {n: str(gptq_recipe(work, args.gptq_samples)) if n == "w4g64-gptq" else n for n in names}
    result = {"model": "bundled SmolLM2-135M-Instruct (GGUF), hfcompress compress default dtype bfloat16",
              "tokens": args.tokens, "data": "WikiText-2 raw test, first tokens of the whole file tokenized",
              "gptq_samples": args.gptq_samples, "stock_environment": {"python": python, **env},
              "project_environment": {"python": sys.executable, "versions": {
                  p: version(p) for p in ("torch", "transformers", "compressed-tensors")}},
              "recipes": {}}
    for name, recipe in recipes.items():
        result["recipes"][name] = {"compress": compress(name, recipe, work, args.reuse),
                                   "expect_compressed_tensors": RECIPES[name]}
    done = [n for n in names if "error" not in result["recipes"][n]["compress"]]
    if not done:
        raise SystemExit("every compress failed")

    ids, tokenizer = wikitext_ids(work / done[0], args.data, args.tokens)
    torch.save({"input_ids": ids}, work / "ids.pt")
    spec = {"ids": str(work / "ids.pt"), "prompt_tokens": args.prompt_tokens, "out": str(work / "stock.json"),
            "folders": {n: {"folder": str(work / n),
                            **{f"{kind}_{v}": str(work / f"{n}.stock-{kind}-{v}.pt")
                               for kind in ("logits", "weights") for v in ("default", "float32")}}
                        for n in done}}
    (work / "stock-spec.json").write_text(json.dumps(spec, indent=2))
    start = time.perf_counter()
    proc = subprocess.run([python, str(HERE), "--stock-worker", str(work / "stock-spec.json")], cwd=work,
                          capture_output=True, text=True)
    (work / "stock.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"the stock worker failed ({proc.returncode}); see {work / 'stock.log'}:\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    stock = json.loads((work / "stock.json").read_text())
    result["stock_worker_seconds"] = round(time.perf_counter() - start, 1)
    result["stock_worker_imported_hfcompress"] = stock.pop("_hfcompress_imported")

    for name in done:
        r = result["recipes"][name]
        job = spec["folders"][name]
        r["stock"] = stock[name]
        s = stock[name]["default"]
        if not s["loaded"]:
            r["ok"] = (not r["expect_compressed_tensors"]) and s["message_names_hfcompress"]
            continue
        mine = ours(work / name, ids, args.prompt_tokens, s["dtype"],
                    {v: Path(job[f"weights_{v}"]) for v in ("default", "float32") if stock[name][v].get("loaded")})
        r["ours"] = {"dtype": mine["dtype"], "load_seconds": mine["load_seconds"],
                     "generated_ids": mine["generated_ids"], "generated_ids_float32": mine["generated_ids_float32"],
                     "first_token_margin_float32": mine["first_token_margin_float32"]}
        r["weights_vs_ours"] = mine["weights"]
        r["logit_scale"] = mine["auto"].abs().max().item()
        theirs = torch.load(job["logits_default"], weights_only=True)["logits"]
        r["vs_ours"] = compare(theirs, mine["auto"])
        r["vs_ours_reference"] = compare(theirs, mine["reference"])
        r["vs_ours_float32"] = compare(theirs, mine["float32"])
        r["floor_ours_vs_ours_float32"] = compare(mine["auto"], mine["float32"])
        if s["dtype"] not in (mine["dtype"], "float32"):
            r["vs_ours_in_stock_dtype"] = compare(theirs, mine[s["dtype"]])
            r["floor_ours_in_stock_dtype_vs_ours"] = compare(mine[s["dtype"]], mine["auto"])
        if stock[name]["float32"].get("loaded"):
            theirs32 = torch.load(job["logits_float32"], weights_only=True)["logits"]
            r["float32_stock_vs_ours_float32"] = compare(theirs32, mine["float32"])
        s32 = stock[name]["float32"]
        r["generate"] = {"stock_vs_ours": s["generated_ids"] == mine["generated_ids"],
                         "stock_vs_ours_float32": s["generated_ids"] == mine["generated_ids_float32"],
                         "ours_vs_ours_float32": mine["generated_ids"] == mine["generated_ids_float32"],
                         "both_float32": s32.get("generated_ids") == mine["generated_ids_float32"],
                         "text": {"stock": tokenizer.decode(s["generated_ids"]),
                                  "ours": tokenizer.decode(mine["generated_ids"]),
                                  "ours_float32": tokenizer.decode(mine["generated_ids_float32"])}}
        # Within float tolerance: (a) in float32 the stock logits are ours (to 1e-4 of the logit
        # scale), and (b) in the stock model's dtype its logits are no further from the float32
        # ones than twice the distance of our own model in its dtype (max difference), with argmax
        # agreement at most 2 points below ours.
        floor, to32 = r["floor_ours_vs_ours_float32"], r["vs_ours_float32"]
        r["ok"] = bool(r["expect_compressed_tensors"] and "float32_stock_vs_ours_float32" in r
                       and r["float32_stock_vs_ours_float32"]["max_abs_diff"] <= 1e-4 * r["logit_scale"]
                       and to32["max_abs_diff"] <= 2 * floor["max_abs_diff"]
                       and to32["argmax_agreement"] >= floor["argmax_agreement"] - 0.02)
        if not args.keep_tensors:
            for key in ("logits_default", "logits_float32", "weights_default", "weights_float32"):
                Path(job[key]).unlink(missing_ok=True)
    for name in set(names) - set(done):
        result["recipes"][name]["ok"] = False
    result["all_ok"] = all(r["ok"] for r in result["recipes"].values())
    print(json.dumps(result, indent=2))
    print(table(result))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
