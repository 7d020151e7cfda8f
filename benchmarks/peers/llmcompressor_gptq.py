"""GPTQ with llm-compressor, the peer side of the GPTQ side-by-side benchmark.

Run with the python of the venv that ``setup_llmcompressor.sh`` builds (NOT the project's venv:
llm-compressor pins its own transformers and compressed-tensors)::

    PEER="${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}/llmcompressor-venv/bin/python"
    "$PEER" benchmarks/peers/llmcompressor_gptq.py --model MODEL_DIR \
        --windows windows.safetensors --output OUT_DIR --json result.json

``--windows`` is a safetensors file with one int64 tensor ``input_ids`` of shape [n, seq_len]:
the calibration windows, used exactly as given (one sample per row, no re-tokenization, no
shuffling, no truncation). The model is loaded in float32 on CPU, quantized by llm-compressor's
``oneshot`` with a ``GPTQModifier`` (int weights, symmetric, group strategy, static act-order by
default; Linear layers, ``lm_head`` ignored), and saved in the compressed-tensors format.

The JSON written to ``--json``::

    {"tool": "llmcompressor", "versions": {...}, "quantize_seconds": <oneshot alone>,
     "total_seconds": <load + quantize + save>, "peak_rss_bytes": <ru_maxrss of this process>,
     "output_bytes": <size of the files under --output>, "args": {...}, ...}

API notes (llmcompressor 0.14.0.1, read from its source):
* ``GPTQModifier`` lives in ``llmcompressor.modifiers.gptq`` (the old
  ``llmcompressor.modifiers.quantization.gptq`` path still works but warns).
* ``oneshot`` shuffles the calibration samples unless ``shuffle_calibration_samples=False``;
  without shuffling it orders samples by length (``LengthAwareSampler``), which for windows of
  one length changes nothing but, at most, the order in which Hessians are summed.
* ``oneshot`` insists on a processor whenever a dataset is given, even a pre-tokenized one: the
  model folder's tokenizer is used when it has one, otherwise a no-op stand-in is passed.
* Group quantization refuses layers whose input features are not a multiple of the group
  size (``columns >= group_size and columns % group_size != 0``) with a ValueError at
  initialize, before calibration: SmolLM2-135M (576 and 1536) takes 64 (also 16, 32, 48,
  96, 192) but not 128 (576 = 4.5 x 128), the group size of llm-compressor's W4A16 preset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# Everything is local: never let a loader try the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors",
                 "datasets", "accelerate", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class _NoProcessor:
    """Stand-in for a tokenizer when the model folder has none.

    The windows are already token ids, so oneshot never calls it; it only requires one to
    exist when a dataset is passed, and saves it next to the model.
    """

    def save_pretrained(self, *args, **kwargs):
        return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="float transformers checkpoint folder")
    p.add_argument("--windows", required=True,
                   help="safetensors file with an int64 tensor input_ids [n, seq_len]")
    p.add_argument("--output", required=True, help="folder for the compressed-tensors model")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening fraction")
    p.add_argument("--actorder", default="static",
                   help="static (= weight) or none")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ block size (columns)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--json", required=True, help="where to write the result JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()

    import torch
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    if args.threads:
        torch.set_num_threads(args.threads)

    # --- calibration windows, exactly as given --------------------------------------------
    tensors = load_file(args.windows)
    if "input_ids" not in tensors:
        raise SystemExit(f"{args.windows}: no tensor named input_ids (has {sorted(tensors)})")
    ids = tensors["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"input_ids must be [n, seq_len], got {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    n, seq_len = (int(s) for s in ids.shape)
    dataset = Dataset.from_dict({
        "input_ids": ids.tolist(),
        "attention_mask": torch.ones_like(ids).tolist(),
    })

    # --- model: float32, CPU ----------------------------------------------------------------
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    try:
        processor = AutoTokenizer.from_pretrained(args.model)
    except Exception:  # a bare checkpoint folder (no tokenizer files)
        processor = _NoProcessor()
    load_seconds = time.perf_counter() - t_load

    actorder = None if args.actorder.lower() in ("none", "null", "off", "false") else args.actorder
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=True,
        strategy="group",
        group_size=args.group_size,
        dynamic=False,
    )
    modifier = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=args.damp,
        block_size=args.block_size,
        # Set on the modifier only: it resolves into the scheme's weights (which leave it
        # unset); setting it in both places with differing spellings raises.
        actorder=actorder,
    )

    # --- oneshot (calibration + GPTQ), timed alone --------------------------------------------
    t_q = time.perf_counter()
    model = oneshot(
        model=model,
        processor=processor,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
        pad_to_max_length=False,
        concatenate_data=False,
        output_dir=None,  # saved below, outside the timed region
    )
    quantize_seconds = time.perf_counter() - t_q

    # --- save (compressed-tensors) ------------------------------------------------------------
    t_s = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), save_compressed=True)
    if not isinstance(processor, _NoProcessor):
        processor.save_pretrained(str(out))
    save_seconds = time.perf_counter() - t_s
    total_seconds = time.perf_counter() - t_load

    qconfig = None
    config_path = out / "config.json"
    if config_path.exists():
        qconfig = json.loads(config_path.read_text()).get("quantization_config")

    result = {
        "tool": "llmcompressor",
        "versions": _versions(),
        "quantize_seconds": quantize_seconds,
        "total_seconds": total_seconds,
        "load_seconds": load_seconds,
        "save_seconds": save_seconds,
        "process_seconds": time.perf_counter() - t_start,
        "peak_rss_bytes": _peak_rss_bytes(),
        "output_bytes": _folder_bytes(out),
        # the weights alone: output_bytes also counts config, recipe and tokenizer files
        "safetensors_bytes": sum(p.stat().st_size for p in out.rglob("*.safetensors")),
        "output_files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
        "torch_threads": torch.get_num_threads(),
        "args": {
            "model": str(args.model),
            "windows": str(args.windows),
            "output": str(out),
            "n_samples": n,
            "seq_len": seq_len,
            "bits": args.bits,
            "group_size": args.group_size,
            "symmetric": True,
            "damp": args.damp,
            "actorder": args.actorder,
            "block_size": args.block_size,
            "ignore": ["lm_head"],
            "dtype": "float32",
            "device": "cpu",
        },
        "quantization_config": qconfig,
    }
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(json_path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(json_path)
    print(json.dumps({k: result[k] for k in
                      ("quantize_seconds", "total_seconds", "peak_rss_bytes", "output_bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
