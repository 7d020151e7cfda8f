"""Run a GPTQ "v1" checkpoint through GPTQModel's pure-torch CPU kernel and save the logits.

This is the third-party reader check for hfcompress's GPTQ exports: GPTQModel's own loader reads
`qweight` / `qzeros` / `scales` / `g_idx` from the checkpoint, converts the v1 zero points itself
and dequantizes with its `TorchLinear` kernel (BACKEND.TORCH -> BACKEND.GPTQ_TORCH). Run it with the
python of the venv that `setup_gptqmodel.sh` creates, not with the project's:

    PEER="${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}/gptqmodel-venv/bin/python"
    "$PEER" benchmarks/peers/gptqmodel_logits.py --model DIR --ids ids.safetensors \\
        --out logits.safetensors --json logits.json

--ids is a safetensors file with an int64 tensor `input_ids` [batch, seq]; --out gets a float32
tensor `logits` [batch, seq, vocab]. The forward runs with use_cache=False and no attention mask
(every position is real). Load path: `GPTQModel.load(DIR, backend=BACKEND.TORCH, device="cpu",
dtype=...)`, i.e. `GPTQModel.from_quantized`, not transformers' `from_pretrained`.

Workarounds for GPTQModel 7.6.0 that this script applies (see benchmarks/README.md):
- GPTQModel always loads a tokenizer from the checkpoint folder and fails without one. When DIR
  has no tokenizer files, the script loads from a temporary folder that links DIR's files and adds
  a throw-away word-level tokenizer (the tokenizer plays no part in the forward pass).
- On a machine with fewer than 3 cores its default CPU thread pool is smaller than the 2 workers
  its model-loader pool asks for and construction fails, so GPTQMODEL_CPU_WORKERS defaults to 2.
- TorchLinear wraps its dequantize function in torch.compile (inductor, which generates and
  compiles C++ at run time). By default this script sets TORCHDYNAMO_DISABLE=1 so that the same
  Python dequantization runs eagerly; --compile keeps GPTQModel's default.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GPTQ v1 checkpoint folder")
    p.add_argument("--ids", required=True, help="safetensors file with int64 `input_ids` [batch, seq]")
    p.add_argument("--out", required=True, help="safetensors file to write (float32 `logits`)")
    p.add_argument("--json", required=True, help="JSON file to write (versions, backend, timings)")
    p.add_argument("--dtype", default="float16", choices=["bfloat16", "float16", "auto"],
                   help="activation/compute dtype passed to GPTQModel.load (default float16, the dtype of the "
                        "scales; GPTQModel's 'auto' picks bfloat16 on CPU. TorchLinear accepts only fp16/bf16 and "
                        "refuses float32 with a ValueError)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--compile", action="store_true",
                   help="keep GPTQModel's torch.compile of the dequantize step (default: eager)")
    return p.parse_args(argv)


def stage_tokenizer(model_dir: Path, tmp: Path) -> Path:
    """Return a folder that GPTQModel can load: model_dir itself when it has a tokenizer, otherwise
    a temporary folder with symlinks to model_dir's files plus a dummy word-level tokenizer."""
    if any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return model_dir
    staged = tmp / "model"
    staged.mkdir()
    for entry in model_dir.iterdir():
        (staged / entry.name).symlink_to(entry.resolve())
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<unk>").save_pretrained(str(staged))
    return staged


def versions() -> dict:
    from importlib.metadata import version

    out = {}
    for name in ("gptqmodel", "torch", "transformers", "accelerate", "safetensors", "optimum", "torchao"):
        try:
            out[name] = version(name)
        except Exception:
            out[name] = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # Environment must be set before torch / gptqmodel are imported.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not args.compile:
        os.environ["TORCHDYNAMO_DISABLE"] = "1"

    t_import = time.perf_counter()
    import torch
    from safetensors.torch import load_file, save_file

    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    import_seconds = time.perf_counter() - t_import
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = Path(args.model).resolve()
    ids = load_file(args.ids)["input_ids"]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"--ids: expected int64 input_ids [batch, seq], got {ids.dtype} {tuple(ids.shape)}")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory(prefix="gptqmodel-logits-") as tmp:
        load_dir = stage_tokenizer(model_dir, Path(tmp))
        t0 = time.perf_counter()
        qmodel = GPTQModel.load(str(load_dir), backend=BACKEND.TORCH, device="cpu", dtype=dtype)
        load_seconds = time.perf_counter() - t0

    hf_model = qmodel.model
    hf_model.eval()
    kernels, qzero_formats, backends, n_quant = {}, {}, set(), 0
    for name, module in hf_model.named_modules():
        if isinstance(module, BaseQuantLinear):
            n_quant += 1
            cls = type(module).__name__
            kernels[cls] = kernels.get(cls, 0) + 1
            fmt = str(module.qzero_format()) if hasattr(module, "qzero_format") else "?"
            qzero_formats[fmt] = qzero_formats.get(fmt, 0) + 1
            b = getattr(module, "backend", None)
            backends.add(str(getattr(b, "value", b)))
    if n_quant == 0:
        raise SystemExit("GPTQModel loaded no quantized linear module: not a GPTQ checkpoint?")
    if set(kernels) != {"TorchLinear"}:
        raise SystemExit(f"expected GPTQModel's TorchLinear kernel everywhere, got {kernels}")

    t1 = time.perf_counter()
    with torch.inference_mode():
        out = hf_model(input_ids=ids, use_cache=False)
    forward_seconds = time.perf_counter() - t1
    logits = out.logits.float().contiguous()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits}, args.out)

    param_dtype = next((p.dtype for p in hf_model.parameters()), None)
    qcfg = qmodel.quantize_config
    report = {
        "tool": "gptqmodel",
        "versions": versions(),
        "load_api": 'GPTQModel.load(dir, backend=BACKEND.TORCH, device="cpu", dtype=...)',
        "backend_requested": str(BACKEND.TORCH.value),
        "backend_used": sorted(backends),  # per-module `backend` of the loaded kernels
        "qlinear_kernel": getattr(getattr(qmodel, "qlinear_kernel", None), "__name__", None),
        "kernels": kernels,
        "qzero_format_after_load": qzero_formats,
        "quantized_modules": n_quant,
        "dtype_requested": args.dtype,
        "model_dtype": str(param_dtype),
        "torch_compile": bool(args.compile),
        "tokenizer_staged": load_dir != model_dir,
        "quantize_config": {k: getattr(qcfg, k, None) for k in ("bits", "group_size", "desc_act", "sym", "lm_head")}
        | {"format": str(getattr(getattr(qcfg, "format", None), "value", None)),
           "checkpoint_format": str(getattr(getattr(qcfg, "checkpoint_format", None), "value",
                                            getattr(qcfg, "checkpoint_format", None)))},
        "import_seconds": import_seconds,
        "load_seconds": load_seconds,
        "forward_seconds": forward_seconds,
        "input_shape": list(ids.shape),
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        # Whether the loaded model reads its output layer from the input embedding matrix.
        "lm_head_is_embeddings": hf_model.get_output_embeddings().weight.data_ptr()
        == hf_model.get_input_embeddings().weight.data_ptr(),
        "torch_threads": torch.get_num_threads(),
        "args": vars(args),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({k: report[k] for k in ("versions", "backend_used", "kernels", "load_seconds",
                                             "forward_seconds", "logits_shape", "logits_finite")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
