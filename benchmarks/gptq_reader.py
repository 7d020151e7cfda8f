"""Our GPTQ v1 export, read by real third-party readers, against our own logits.

    python benchmarks/gptq_reader.py [--model tiny|smollm2|DIR] [--venv DIR | --python PY] [--json out.json]

Each hfcompress folder is exported with ``export_model(folder, "gptq", ...)`` (what
``hfcompress export DIR --format gptq`` runs), then read, in a separate virtual environment that
has no hfcompress in it, by:

- ``gptqmodel``: ``GPTQModel.load(export, backend=BACKEND.TORCH, device="cpu", dtype=float16)``,
  GPTQModel's own loader and its pure-PyTorch ``TorchLinear`` kernel;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(export, dtype=bfloat16, device_map="cpu")``,
  i.e. transformers' ``GptqHfQuantizer`` -> optimum's ``GPTQQuantizer`` -> GPTQModel's kernel
  selection (on CPU it picks ``TorchAtenLinear``, torch's int4 matmul, which computes in bfloat16).

Both readers compute in 16 bits, so each is compared with our model in float32 (reference path:
dequantize, then matmul) and with our model in the reader's dtype (default path); the second
comparison against float32 gives the rounding floor. A reader is ``within_floor`` when its max
absolute logit difference to our float32 logits is at most ``2 * floor + 1e-3 * logit scale``: a
layout error (zero points off by one, a wrong group index, transposed tensors) is far above that.
Where a reader cannot read a case at all (``known_limitation``: transformers with a quantized
``lm_head``, GPTQModel with ``sym: false``) the failure is expected; ``all_as_expected`` sums up.

Models: ``tiny`` (default) is a random Llama (hidden 128, intermediate 256, 2 layers, 4 heads,
2 kv heads, vocab 512, untied) quantized in several variants (``--variants``; see ``VARIANTS``),
read on fixed random token ids. ``smollm2`` is the bundled SmolLM2-135M-Instruct compressed with
``--recipe`` (default ``w4g64-rtn``, about 1-3 minutes on 2 cores), read on the first ``--tokens``
tokens of WikiText-2 test. A folder is any hfcompress output with a tokenizer.

The reader venv (``--venv``, default ``$HFCOMPRESS_BENCH_HOME/gptq-reader-venv``) is created when
missing: ``python3 -m venv``, ``pip install torch==2.13.0`` (the CPU wheel) first, then
``gptqmodel==7.6.0 optimum==2.3.0`` with torch held at 2.13.0 (about 4 minutes on 2 busy cores).
``--python PY`` uses an existing interpreter as is. The same file runs on the reader side
(``--reader-side JOB.json``): this module imports only the standard library at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_HOME = Path(os.environ.get("HFCOMPRESS_BENCH_HOME", Path.home() / ".cache" / "hfcompress-bench"))
TORCH_VERSION = "2.13.0"
# gptqmodel 7.7.0 asks for torch>=2.14.1 (a CUDA build from PyPI); 7.6.0 is the newest that takes 2.13.0.
READER_PACKAGES = ["gptqmodel==7.6.0", "optimum==2.3.0", "safetensors"]
LOADERS = ("gptqmodel", "transformers")

# Tiny-model variants: the quantize stage of each (RTN unless "method" says otherwise), and the
# result expected from the readers when it is not a clean load ("refused": an error is expected).
VARIANTS = {
    "w4g32": {"bits": 4, "group_size": 32},
    "w4g32-gptq-act-order": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True},
    "w4-channel": {"bits": 4, "group_size": -1},
    "w4g32-lm-head": {"bits": 4, "group_size": 32, "lm_head": True},
    "w8g32": {"bits": 8, "group_size": 32},
    "w3g32": {"bits": 3, "group_size": 32},
    "w2g32": {"bits": 2, "group_size": 32},
    "w4g32-asym": {"bits": 4, "group_size": 32, "sym": False},
}


def known_limitation(quantization_config: dict, loader: str) -> str | None:
    """Why a reader cannot read an export right, where the reader (not the export) is the limit."""
    if loader == "transformers" and quantization_config.get("lm_head"):
        return ("transformers + optimum replace only the decoder blocks' linears: lm_head.qweight/qzeros/scales/g_idx "
                "load as UNEXPECTED and lm_head.weight as MISSING (randomly initialized), so the logits are wrong")
    if loader == "gptqmodel" and not quantization_config.get("sym", True):
        return ("GPTQModel refuses sym=False with checkpoint_format gptq unless meta.quantizer names "
                "gptqmodel >= 0.9.0 (older producers' asymmetric v1 zero points could underflow)")
    return None


TINY = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": False}


# ----------------------------------------------------------------------------------------------
# Reader side (runs in the reader venv: torch, transformers, optimum, gptqmodel; no hfcompress)
# ----------------------------------------------------------------------------------------------

def _reader_versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("gptqmodel", "optimum", "transformers", "torch", "accelerate", "safetensors", "torchao", "numpy"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def reader_side(job_file: Path) -> int:
    # Before torch / gptqmodel are imported: GPTQModel's loader pool wants 2 CPU workers, which its
    # default pool ((cores + 1) // 2) lacks on 2 cores; its kernels' torch.compile would build C++
    # with inductor (slow, and not what is checked here): run the same Python eagerly.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import gc

    import torch
    from safetensors.torch import load_file, save_file

    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM

    job = json.loads(job_file.read_text())
    report = {"versions": _reader_versions(), "items": {}}

    def kernels(model) -> dict:
        found = {}
        for module in model.modules():
            if isinstance(module, BaseQuantLinear):
                found[type(module).__name__] = found.get(type(module).__name__, 0) + 1
        return found

    for item in job["items"]:
        ids = load_file(item["ids"])["input_ids"]
        results = report["items"][item["name"]] = {}
        for loader in item["loaders"]:
            dtype = getattr(torch, job["dtypes"][loader])
            record = {"dtype": job["dtypes"][loader]}
            model = qmodel = None
            try:
                start = time.perf_counter()
                if loader == "gptqmodel":
                    qmodel = GPTQModel.load(item["export"], backend=BACKEND.TORCH, device="cpu", dtype=dtype)
                    model = qmodel.model
                else:
                    model = AutoModelForCausalLM.from_pretrained(item["export"], dtype=dtype, device_map="cpu")
                record["load_seconds"] = round(time.perf_counter() - start, 2)
                record["kernels"] = kernels(model)
                if not record["kernels"]:
                    raise RuntimeError("no quantized linear was loaded")
                model.eval()
                start = time.perf_counter()
                with torch.inference_mode():
                    logits = model(input_ids=ids, use_cache=False).logits.float().contiguous()
                record["forward_seconds"] = round(time.perf_counter() - start, 2)
                out = Path(job["work"]) / f"{item['name']}.{loader}.safetensors"
                save_file({"logits": logits}, str(out))
                record.update(ok=True, logits=str(out))
            except Exception as error:  # recorded: an expected refusal is a result too
                record.update(ok=False, error=f"{type(error).__name__}: {error}"[:1500])
            results[loader] = record
            print(json.dumps({"item": item["name"], "loader": loader,
                              **{k: v for k, v in record.items() if k != "logits"}}), flush=True)
            del model, qmodel
            gc.collect()
    Path(job["report"]).write_text(json.dumps(report, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------------------------
# Project side (the hfcompress environment)
# ----------------------------------------------------------------------------------------------

def ensure_reader(venv: Path) -> tuple[Path, dict]:
    """The reader venv's python, creating the venv first when it is missing."""
    python = venv / "bin" / "python"
    if python.exists():
        return python, {"created": False}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # from a venv: its base python
    subprocess.run([str(python), "-m", "pip", "install", f"torch=={TORCH_VERSION}"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(f"torch=={TORCH_VERSION}\n")
    env = {**os.environ, "BUILD_CUDA_EXT": "0", "CUDA_VISIBLE_DEVICES": "", "MAX_JOBS": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "-c", constraints.name, *READER_PACKAGES], check=True, env=env)
    os.unlink(constraints.name)
    return python, {"created": True, "install_seconds": round(time.perf_counter() - start, 1)}


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer covering the tiny vocabulary: GPTQModel loads one from every checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def tiny_folder(work: Path, name: str, stage: dict) -> Path:
    import torch

    import hfcompress
    from hfcompress.testing import tiny_model

    model = tiny_model("llama", seed=0, **TINY)
    stage = {"method": "rtn", "sym": True, **stage}
    calibration = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    hfcompress.compress(model, {"stages": [{"quantize": stage}]},
                        calibration_data=calibration if stage["method"] == "gptq" else None)
    return hfcompress.save_compressed(model, work / f"{name}-hfcompress", word_tokenizer(model.config.vocab_size),
                                      overwrite=True)


def smollm2_folder(work: Path, recipe: str) -> Path:
    from hfcompress.cli import main as cli

    folder = work / f"smollm2-{recipe}-hfcompress"
    if not (folder / "config.json").exists():
        if cli(["compress", "--recipe", recipe, "--no-eval", "--output", str(folder), "--overwrite"]) != 0:
            raise SystemExit("hfcompress compress failed")
    return folder


def compare(theirs, ours) -> dict:
    return {"max_abs_diff": round((theirs.float() - ours.float()).abs().max().item(), 6),
            "same_argmax": round((theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(), 4)}


def our_logits(folder: Path, ids, dtypes: set[str]) -> dict:
    """Our float32 logits (reference path), and ours in each 16-bit dtype the readers use (default
    kernels for bfloat16, as a user runs it; float16 on the reference path, whose CPU kernels take
    bfloat16 only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hfcompress.quantization import dispatch

    out = {}
    with torch.no_grad():
        for dtype in ["float32", *sorted(dtypes)]:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
            with dispatch.use("reference" if dtype != "bfloat16" else "auto"):
                out[dtype] = model(ids).logits.float()
            del model
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader-side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help="tiny (default), smollm2, or an hfcompress folder")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="tiny variants, comma-separated")
    parser.add_argument("--recipe", default="w4g64-rtn", help="recipe for --model smollm2")
    parser.add_argument("--tokens", type=int, help="sequence length (default: 512 WikiText-2 tokens, tiny: 64 ids)")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("HFCOMPRESS_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--gptqmodel-dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--transformers-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--venv", type=Path, default=BENCH_HOME / "gptq-reader-venv",
                        help="reader virtual environment, created when missing")
    parser.add_argument("--python", type=Path, help="an existing reader python (skips --venv)")
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)
    if args.reader_side:
        return reader_side(args.reader_side)

    import torch
    from safetensors.torch import load_file, save_file

    import hfcompress
    from hfcompress.errors import UserError
    from hfcompress.export import export_model

    started = time.perf_counter()
    if args.python:
        python, setup = args.python, {"created": False}
    else:
        python, setup = ensure_reader(args.venv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gptq-reader-"))
    work.mkdir(parents=True, exist_ok=True)
    loaders = [name for name in args.loaders.split(",") if name]
    dtypes = {"gptqmodel": args.gptqmodel_dtype, "transformers": args.transformers_dtype}

    folders: dict[str, Path] = {}
    if args.model == "tiny":
        for name in args.variants.split(","):
            folders[name] = tiny_folder(work, name, VARIANTS[name])
    elif args.model == "smollm2":
        folders[f"smollm2-{args.recipe}"] = smollm2_folder(work, args.recipe)
    else:
        folders[Path(args.model).name] = Path(args.model)

    result = {"model": args.model, "reader_python": str(python), "reader_setup": setup, "items": {}}
    items = []
    refs = {}
    for name, folder in folders.items():
        entry = result["items"][name] = {"hfcompress": str(folder)}
        try:
            export = export_model(folder, "gptq", work / f"{name}-gptq", overwrite=True)
        except UserError as error:  # a refusal of the exporter is a result
            entry["export_error"] = f"{type(error).__name__}: {error}"
            continue
        entry["export"] = str(export)
        entry["quantization_config"] = json.loads((export / "config.json").read_text())["quantization_config"]
        if args.model == "tiny":
            vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
            ids = torch.randint(3, vocab, (2, args.tokens or 64), generator=torch.Generator().manual_seed(0))
        else:
            from transformers import AutoTokenizer

            text = args.data / "wikitext-2-raw" / "wiki.test.raw"
            ids = hfcompress.evaluation.tokenize(AutoTokenizer.from_pretrained(folder), text)
            ids = ids[: args.tokens or 512].reshape(1, -1)
        save_file({"input_ids": ids.contiguous()}, work / f"{name}.ids.safetensors")
        refs[name] = our_logits(folder, ids, {dtypes[loader] for loader in loaders})
        entry["logit_scale"] = round(refs[name]["float32"].abs().max().item(), 4)
        entry["floor"] = {dtype: compare(refs[name][dtype], refs[name]["float32"])
                          for dtype in refs[name] if dtype != "float32"}
        items.append({"name": name, "export": str(export), "ids": str(work / f"{name}.ids.safetensors"),
                      "loaders": loaders})

    job = {"items": items, "dtypes": dtypes, "work": str(work), "report": str(work / "reader-report.json")}
    (work / "reader-job.json").write_text(json.dumps(job, indent=2))
    start = time.perf_counter()
    subprocess.run([str(python), str(Path(__file__).resolve()), "--reader-side", str(work / "reader-job.json")],
                   check=True, stdout=sys.stderr)
    result["reader_seconds"] = round(time.perf_counter() - start, 1)
    reader = json.loads((work / "reader-report.json").read_text())
    summary = []
    result["reader_versions"] = reader["versions"]
    for name, records in reader["items"].items():
        entry = result["items"][name]
        entry["readers"] = {}
        for loader, record in records.items():
            out = {k: v for k, v in record.items() if k != "logits"}
            if record["ok"]:
                theirs = load_file(record["logits"])["logits"]
                dtype = record["dtype"]
                out["vs_ours_float32"] = compare(theirs, refs[name]["float32"])
                out[f"vs_ours_{dtype}"] = compare(theirs, refs[name][dtype])
                bound = 2 * entry["floor"][dtype]["max_abs_diff"] + 1e-3 * entry["logit_scale"]
                out["within_floor"] = out["vs_ours_float32"]["max_abs_diff"] <= bound
            known = known_limitation(entry["quantization_config"], loader)
            if known:
                out["known_limitation"] = known
            out["as_expected"] = bool(out.get("within_floor")) != bool(known)
            entry["readers"][loader] = out
            summary.append(f"{name} / {loader} ({record['dtype']}): " + (
                f"max|diff| {out['vs_ours_float32']['max_abs_diff']:.4g} vs ours float32 (floor "
                f"{entry['floor'][record['dtype']]['max_abs_diff']:.4g}, logit scale {entry['logit_scale']:.4g}), "
                f"same argmax {out['vs_ours_float32']['same_argmax']:.2%}" if record["ok"] else record["error"][:120])
                + ("" if out["as_expected"] else "  <-- NOT AS EXPECTED")
                + (" [known reader limitation]" if known else ""))
    result["all_as_expected"] = all(out["as_expected"] for entry in result["items"].values()
                                    for out in entry.get("readers", {}).values()) and \
        not any("export_error" in entry for entry in result["items"].values())
    result["summary"] = summary
    result["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    print("\n".join(summary), file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
