"""Models larger than memory: ``hfcompress compress --layerwise`` against the in-memory path.

1. SmolLM2 (float32 safetensors), the same recipe both ways: the output files must be identical
   (sha256 of every file), with wall time and peak RSS of each whole process.
2. A random-weight Llama of about 1.1B parameters (22 layers, hidden 2048, FFN 5632, 32 heads,
   4 KV heads, SmolLM2's 49,152-token vocabulary; float32, 4.7 GB in 1 GB shards), built once
   with a fixed seed: GPTQ 4-bit g128 and RTN 4-bit g64 layer-wise, peak RSS of the whole process
   (``wait4``), and RTN in memory for reference.

Calibration: Austen text, as token windows in a file (the same windows for every run).

    python benchmarks/layerwise_memory.py --json layerwise.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, measure, prepare_checkpoint, python, save_windows, write_json  # noqa: E402

GPTQ_W4G128 = {"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "sym": True, "act_order": True,
                            "static_groups": True}}
RTN_W4G64 = {"quantize": {"method": "rtn", "bits": 4, "group_size": 64, "sym": True}}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def build_large(folder: Path, tokenizer) -> None:
    """The random 1.1B Llama, saved once (seed 0)."""
    if (folder / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="1GB")
    tokenizer.save_pretrained(folder)


def compress(work: Path, name: str, checkpoint: Path, stages: list | str, windows: Path, layerwise: bool) -> dict:
    recipe = stages  # a bundled recipe's name, or stages written to a file
    if not isinstance(stages, str):
        recipe = work / f"{name}.json"
        recipe.write_text(json.dumps({"stages": stages}))
    output = work / name / "out"  # the same output name everywhere: the model card names it
    cmd = [python(), "-m", "hfcompress.cli", "compress", str(checkpoint), "--recipe", str(recipe),
           "--output", str(output), "--overwrite", "--no-eval", "--dtype", "float32",
           "--calibration-data", str(windows)] + (["--layerwise"] if layerwise else [])
    result = measure(cmd, work / f"{name}.log")
    result["peak_rss_gb"] = round(result.pop("peak_rss_bytes") / 1e9, 3)
    result["output"] = str(output)
    print(json.dumps({name: result}), flush=True)
    return result


def main():
    parser = base_parser(__doc__, "layerwise")
    parser.add_argument("--smollm2-recipe", default="w4g64-gptq")
    parser.add_argument("--large-windows", type=int, default=16, help="calibration windows for the 1.1B model")
    parser.add_argument("--large-seq-len", type=int, default=1024)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--skip-rtn", action="store_true", help="the 1.1B model's GPTQ run only")
    parser.add_argument("--skip-gptq", action="store_true", help="the 1.1B model's RTN runs only")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizer = prepare_checkpoint(args.work)
    austen = args.data / "austen"
    results: dict = {}
    if not args.skip_smollm2:
        windows = args.work / "smollm2-windows.safetensors"
        save_windows(tokenizer, austen, 32, 2048, 0, windows)
        memory = compress(args.work, "smollm2-memory", checkpoint, args.smollm2_recipe, windows, layerwise=False)
        disk = compress(args.work, "smollm2-layerwise", checkpoint, args.smollm2_recipe, windows, layerwise=True)
        same = digests(Path(memory["output"])) == digests(Path(disk["output"]))
        results["smollm2"] = {"recipe": args.smollm2_recipe, "in_memory": memory, "layerwise": disk,
                              "identical_sha256": same, "files": digests(Path(disk["output"]))}
        print(json.dumps({"smollm2_identical_sha256": same}), flush=True)
    if not args.skip_large:
        large = args.work / "llama-1.1b-random"
        build_large(large, tokenizer)
        windows = args.work / "large-windows.safetensors"
        save_windows(tokenizer, austen, args.large_windows, args.large_seq_len, 0, windows)
        shards = sum(f.stat().st_size for f in large.glob("*.safetensors"))
        results["llama_1.1b"] = {"checkpoint_gb": round(shards / 1e9, 2),
                                 "calibration": f"{args.large_windows} windows x {args.large_seq_len} tokens"}
        if not args.skip_gptq:
            results["llama_1.1b"]["gptq_w4g128_layerwise"] = compress(
                args.work, "large-gptq-layerwise", large, [GPTQ_W4G128], windows, True)
        if not args.skip_rtn:
            results["llama_1.1b"].update({
                "rtn_w4g64_layerwise": compress(args.work, "large-rtn-layerwise", large, [RTN_W4G64], windows, True),
                "rtn_w4g64_in_memory": compress(args.work, "large-rtn-memory", large, [RTN_W4G64], windows, False)})
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
