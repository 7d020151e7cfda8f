"""Greedy generation speed, unquantized against 4-bit, same prompt and length, in one run.

    python benchmarks/generate_speed.py [--new-tokens 128] [--repeats 5] [--json out.json]

CPU: the bundled SmolLM2-135M-Instruct in bfloat16 (and float32, for reference) against the same
model quantized to 4-bit (RTN, group 64, symmetric; GPTQ gives the same layout and speed) in
bfloat16, on torch's int4 CPU kernel. GPU (when there is one): also a Llama-shaped
model built from a config (hidden 4096, intermediate 14336, 32 heads / 8 key-value heads, a few
layers, random weights) in float16 against 4-bit group 128 on the Triton kernels.

For each model: decode tokens per second (new tokens over the wall time of ``generate`` with
``min_new_tokens = max_new_tokens``; the prompt is short, so this is decode speed), the median
of ``--repeats`` runs taken in turn (A, B, A, B, ...) so that machine noise hits every model alike.
For the 4-bit model it also reports the largest logit difference between its kernel and the
reference path (dequantize, then matmul) on the prompt, and whether both generate the same tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import write_json

PROMPT = "The history of the printing press begins"


def decode_speed(models: dict, input_ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    samples: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up: repacks, allocator, thread pools
        model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            seconds = time.perf_counter() - start
            assert out.shape[1] == input_ids.shape[1] + new_tokens
            samples[name].append(new_tokens / seconds)
    return {name: {"tokens_per_second": round(statistics.median(s), 2), "samples": [round(v, 2) for v in s]}
            for name, s in samples.items()}


@torch.no_grad()
def kernel_vs_reference(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    from hfcompress.quantization import dispatch

    logits = model(input_ids).logits.float()
    tokens = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
    with dispatch.use("reference"):
        ref_logits = model(input_ids).logits.float()
        ref_tokens = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)
    return {"max_abs_logit_diff_vs_reference": (logits - ref_logits).abs().max().item(),
            "logit_scale": ref_logits.abs().max().item(),
            "same_greedy_tokens_as_reference": bool(torch.equal(tokens, ref_tokens))}


def rtn(bits: int, group_size: int) -> dict:
    return {"stages": [{"quantize": {"method": "rtn", "bits": bits, "group_size": group_size, "sym": True}}]}


def cpu_run(args) -> dict:
    import hfcompress
    from hfcompress.io import load_model

    model32, tokenizer, _ = load_model(None, dtype=torch.float32)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    model16 = load_model(None, dtype=torch.bfloat16)[0]
    q16 = hfcompress.compress(load_model(None, dtype=torch.bfloat16)[0], rtn(4, 64))
    kernels = hfcompress.prepare_kernels(q16)
    speeds = decode_speed({"bf16": model16, "w4g64_bf16": q16, "fp32": model32}, input_ids, args.new_tokens,
                          args.repeats)
    return {
        "model": "SmolLM2-135M-Instruct (bundled)", "device": "cpu", "threads": torch.get_num_threads(),
        "prompt_tokens": input_ids.shape[1], "new_tokens": args.new_tokens, "kernels": kernels,
        "models": speeds,
        "speedup_w4_bf16_over_bf16": round(speeds["w4g64_bf16"]["tokens_per_second"]
                                           / speeds["bf16"]["tokens_per_second"], 3),
        "w4g64_bf16_vs_reference": kernel_vs_reference(q16, input_ids, 32),
    }


def gpu_run(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import hfcompress

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=args.gpu_layers, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        fp16 = LlamaForCausalLM(config).half().eval()
        q = LlamaForCausalLM(config).half().eval()
    q.load_state_dict(fp16.state_dict())
    hfcompress.compress(q, rtn(4, 128))
    kernels = hfcompress.prepare_kernels(q)
    input_ids = torch.randint(0, 32000, (1, 16), device="cuda")
    speeds = decode_speed({"fp16": fp16, "w4g128": q}, input_ids, args.new_tokens, args.repeats)
    return {"model": f"Llama-shaped, {args.gpu_layers} layers, random weights", "device": torch.cuda.get_device_name(),
            "kernels": kernels, "models": speeds,
            "speedup_w4_over_fp16": round(speeds["w4g128"]["tokens_per_second"] / speeds["fp16"]["tokens_per_second"], 3),
            "w4g128_vs_reference": kernel_vs_reference(q, input_ids, 16)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-layers", type=int, default=8)
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    result = {"cpu": cpu_run(args)}
    if torch.cuda.is_available():
        result["gpu"] = gpu_run(args)
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
