"""Per-layer costs of GPTQ measured here, and the plan they give for Llama-3-70B and a 235B MoE.

Measures, on one random decoder block of the 1.1B Llama (hidden 2048, FFN 5632, 32 heads, 4 KV
heads; float32 on this CPU), the three parts of a GPTQ block step: the block's forward over
calibration tokens, the Hessian accumulation (``2/n X^T X`` per distinct input), and the solve
(``gptq_quantize``, 4-bit g128, act-order static groups) of every linear. Each part's FLOPs are
counted from the shapes, so each measured time gives a rate; the plan then counts the same FLOPs
for the target models and divides by an H200's rates (dense bf16 989 TFLOP/s and fp32 67 TFLOP/s,
at the efficiency this machine reached on the same kind of work relative to its own peak, capped
at 60%), adds the checkpoint reads, and prints memory and time for 1 and 8 GPUs.

    python benchmarks/gptq_costs.py --json costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

H200 = {"bf16_flops": 989e12, "fp32_flops": 67e12, "hbm_bytes": 141e9, "nvme_bytes_per_s": 5e9, "nvlink_bytes_per_s": 450e9}
TOKENS = 128 * 2048  # the calibration of the plan: 128 windows of 2048 tokens
PASSES = 3.0  # block forwards per window in a GPTQ walk (measured 2.85-3.1, calibration.PASSES_PER_WINDOW)


@dataclass
class Shape:
    """One decoder block, as the plan counts it."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # per expert for MoE
    experts: int = 1
    active: int = 1
    vocab: int = 128256

    def linears(self) -> list[tuple[str, int, int, int]]:
        """``(group, in_features, out_features, tokens share)`` per linear (experts: one of each)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        share = self.active / self.experts
        return [("qkv", self.hidden, q + 2 * kv, 1), ("o", q, self.hidden, 1),
                ("gate_up", self.hidden, 2 * self.ffn, share), ("down", self.ffn, self.hidden, share)]

    def block_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + self.experts * 3 * self.hidden * self.ffn


LLAMA_1B = Shape("llama-1.1b (measured here)", 22, 2048, 32, 4, 64, 5632, vocab=49152)
LLAMA_70B = Shape("Llama-3-70B", 80, 8192, 64, 8, 128, 28672)
MOE_235B = Shape("Qwen3-235B-A22B", 94, 4096, 64, 4, 128, 1536, experts=128, active=8, vocab=151936)


def forward_flops(shape: Shape, tokens: int) -> float:
    dense = sum(2 * k * n * (1 if g in ("qkv", "o") else shape.active) for g, k, n, _ in shape.linears())
    return dense * tokens


def hessian_flops(shape: Shape, tokens: int) -> float:
    return sum(2 * tokens * share * k * k * (shape.experts if share < 1 else 1) for _, k, _, share in shape.linears())


def solve_flops(shape: Shape) -> float:
    """Cholesky of H (k^3/3, twice: factor and inverse) and the column loop's updates (2 k^2 n)."""
    return sum((2 * k ** 3 / 3 + 2 * k * k * n) * (shape.experts if share < 1 else 1)
               for _, k, n, share in shape.linears())


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(tokens: int, repeats: int) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from hfcompress.quantization.gptq import accumulate_hessian, gptq_quantize

    torch.manual_seed(0)
    s = LLAMA_1B
    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.ffn, num_attention_heads=s.heads,
                         num_key_value_heads=s.kv_heads, num_hidden_layers=1)
    block = LlamaDecoderLayer(config, 0).eval()
    rotary = LlamaRotaryEmbedding(config)
    seq = 2048
    x = torch.randn(1, seq, s.hidden)
    position = rotary(x, torch.arange(seq)[None])
    windows = tokens // seq

    @torch.no_grad()
    def forward():
        for _ in range(windows):
            block(x, position_embeddings=position)

    rows = {}
    seconds = _time(forward, repeats)
    rows["forward"] = {"seconds": seconds, "flops": forward_flops(s, tokens)}
    inputs = {k: torch.randn(tokens, k) for k in {k for _, k, _, _ in s.linears()}}

    def hessians():
        for _, k, _, _ in s.linears():
            accumulate_hessian(torch.zeros(k, k), inputs[k], 0)

    rows["hessian"] = {"seconds": _time(hessians, repeats), "flops": hessian_flops(s, tokens)}
    H = {k: (v.T @ v) / tokens for k, v in inputs.items()}
    weights = {g: torch.randn(n, k) for g, k, n, _ in s.linears()}

    def solve():
        for g, k, _, _ in s.linears():
            gptq_quantize(weights[g], H[k], 4, 128, True, act_order=True, static_groups=True)

    rows["solve"] = {"seconds": _time(solve, max(1, repeats // 2)), "flops": solve_flops(s)}
    for row in rows.values():
        row["gflops_per_s"] = round(row["flops"] / row["seconds"] / 1e9, 1)
        row["seconds"] = round(row["seconds"], 3)
    return {"block": s.name, "tokens": tokens, "threads": torch.get_num_threads(), "parts": rows}


def plan(shape: Shape, measured: dict, cpu_peak: float) -> dict:
    """Memory and time of GPTQ 4-bit on one H200 and on eight, one block at a time from disk."""
    parts = measured["parts"]
    # The efficiency this machine reached on each kind of work, against its peak (capped at 60%).
    eff = {name: min(0.6, parts[name]["gflops_per_s"] * 1e9 / cpu_peak) for name in parts}
    block_bytes = shape.block_params() * 2  # bf16
    hessian_bytes = sum(k * k * 4 * (shape.experts if share < 1 else 1) for _, k, _, share in shape.linears())
    activations = TOKENS * shape.hidden * 2
    checkpoint = (shape.block_params() * shape.layers + 2 * shape.vocab * shape.hidden) * 2
    forward = PASSES * forward_flops(shape, TOKENS) * shape.layers / (H200["bf16_flops"] * eff["forward"])
    hessian = hessian_flops(shape, TOKENS) * shape.layers / (H200["fp32_flops"] * eff["hessian"])
    solve = solve_flops(shape) * shape.layers / (H200["fp32_flops"] * eff["solve"])
    reads = 3 * checkpoint / H200["nvme_bytes_per_s"]  # two probe windows and the walk each read every block
    one = forward + hessian + solve + reads
    # Eight processes: windows split 8 ways (forward, Hessians); groups solved round robin, so the
    # largest group of a block bounds it (dense: the down projection); the Hessians all-reduced
    # once per block over NVLink; the page cache shares the reads.
    largest = (max(2 * k ** 3 / 3 + 2 * k * k * n for _, k, n, _ in shape.linears()) if shape.experts == 1
               else solve_flops(shape) / 8)
    eight = (forward + hessian) / 8 + largest * shape.layers / (H200["fp32_flops"] * eff["solve"]) + reads + \
        2 * hessian_bytes * shape.layers / H200["nvlink_bytes_per_s"]
    return {
        "model": shape.name, "parameters_billion": round((shape.block_params() * shape.layers
                                                           + 2 * shape.vocab * shape.hidden) / 1e9, 1),
        "checkpoint_gb_bf16": round(checkpoint / 1e9), "block_gb_bf16": round(block_bytes / 1e9, 2),
        "hessians_gb_fp32": round(hessian_bytes / 1e9, 2), "activations_gb": round(activations / 1e9, 2),
        "gpu_memory_gb": round((block_bytes + hessian_bytes + 2 * activations) / 1e9, 1),
        "minutes_1xH200": {"forward": round(forward / 60, 1), "hessians": round(hessian / 60, 1),
                           "solve": round(solve / 60, 1), "reads": round(reads / 60, 1), "total": round(one / 60, 1)},
        "minutes_8xH200": round(eight / 60, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 2048, help="calibration tokens of the measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-peak-gflops", type=float, default=None,
                        help="this CPU's peak (default: a large float32 matmul measured here)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.cpu_peak_gflops is None:
        a = torch.randn(4096, 4096)
        peak = 2 * 4096 ** 3 / _time(lambda: a @ a, 3)
    else:
        peak = args.cpu_peak_gflops * 1e9
    measured = measure(args.tokens, args.repeats)
    measured["cpu_matmul_gflops_per_s"] = round(peak / 1e9, 1)
    result = {"measured": measured, "plans": [plan(s, measured, peak) for s in (LLAMA_70B, MOE_235B)],
              "assumptions": {**{k: v for k, v in H200.items()}, "calibration_tokens": TOKENS,
                              "block_forwards_per_window": PASSES}}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
