"""Our exports, read by the real readers, against our own logits.

    python benchmarks/export_readers.py MODEL_DIR [--tokens 512] [--json out.json]

MODEL_DIR is an hfcompress output (for example the GPTQ folder of gptq_vs_llmcompressor.py).
It is exported to compressed-tensors `pack-quantized` and to GPTQ v1; then, on the first
``--tokens`` tokens of WikiText-2 test:

- ours: ``from_pretrained(MODEL_DIR)`` with hfcompress, float32, reference path (dequantize,
  then matmul: what both readers do);
- compressed-tensors: ``from_pretrained(export)`` in this environment (transformers +
  compressed-tensors, no hfcompress involved in the load), float32;
- GPTQModel: ``benchmarks/peers/gptqmodel_logits.py`` in its own virtual environment
  (``setup_gptqmodel.sh``), torch backend, float16 (the only dtypes its CPU kernel takes).

Prints JSON with the max absolute logit difference of each reader against ours, the logit scale,
and the share of positions where both pick the same next token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import BENCH_HOME, REPO, write_json


def tie(folder: Path, model=None) -> dict:
    """Whether a folder declares and stores its embeddings tied, and whether a loaded model ties them."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys |= set(handle.keys())
    out = {"config_tie_word_embeddings": config.get("tie_word_embeddings"),
           "lm_head_tensor_stored": any(k.startswith("lm_head.") for k in keys)}
    if model is not None:
        out["loaded_lm_head_is_embeddings"] = (
            model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())
    return out


def compare(theirs: torch.Tensor, ours: torch.Tensor) -> dict:
    return {"max_abs_diff": (theirs.float() - ours).abs().max().item(),
            "same_argmax": round((theirs.argmax(-1) == ours.argmax(-1)).float().mean().item(), 4)}


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress
    from hfcompress.export import export_model
    from hfcompress.quantization import dispatch

    work = Path(tempfile.mkdtemp(prefix="export-readers-"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = hfcompress.evaluation.tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")
    ids = ids[: args.tokens].reshape(1, -1)
    ours_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    with dispatch.use("reference"):
        ours = ours_model(ids).logits.float()
    result = {"model": str(args.model), "tokens": args.tokens, "logit_scale": ours.abs().max().item(), "readers": {},
              "tie": tie(args.model, ours_model)}

    ct_dir = export_model(args.model, "compressed-tensors", work / "ct")
    ct = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32)
    result["readers"]["compressed-tensors"] = {
        **compare(ct(ids).logits, ours), "loader": "transformers.AutoModelForCausalLM + compressed-tensors",
        "tie": tie(ct_dir, ct),
        "quantization_config": {k: v for k, v in json.loads((ct_dir / "config.json").read_text())[
            "quantization_config"].items() if k in ("quant_method", "format")}}

    gptq_dir = export_model(args.model, "gptq", work / "gptq")
    peer = BENCH_HOME / "gptqmodel-venv" / "bin" / "python"
    if not peer.exists():
        subprocess.run(["bash", str(REPO / "benchmarks" / "peers" / "setup_gptqmodel.sh")], check=True)
    save_file({"input_ids": ids.contiguous()}, work / "ids.safetensors")
    subprocess.run([str(peer), str(REPO / "benchmarks" / "peers" / "gptqmodel_logits.py"), "--model", str(gptq_dir),
                    "--ids", str(work / "ids.safetensors"), "--out", str(work / "gptqmodel.safetensors"),
                    "--json", str(work / "gptqmodel.json")], check=True)
    peer_info = json.loads((work / "gptqmodel.json").read_text())
    theirs = load_file(work / "gptqmodel.safetensors")["logits"]
    with dispatch.use("reference"):  # float16 rounding alone, as the floor for the float16 reader
        ours16 = torch.nn.Module.half(ours_model)(ids).logits.float()  # transformers' half() refuses quantized models
    result["ours_float16_vs_ours_float32"] = compare(ours16, ours)
    result["readers"]["gptqmodel"] = {
        **compare(theirs, ours), "vs_ours_in_float16": compare(theirs, ours16),
        "tie": {**tie(gptq_dir), "loaded_lm_head_is_embeddings": peer_info.get("lm_head_is_embeddings")},
        "loader": "GPTQModel.load(backend=BACKEND.TORCH), float16",
        "versions": peer_info.get("versions"), "backend_used": peer_info.get("backend_used")}
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
