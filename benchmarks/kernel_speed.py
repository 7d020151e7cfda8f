"""Micro-benchmark of the packed matmul kernels; prints JSON.

    python benchmarks/kernel_speed.py [--json out.json]          # GPU if there is one, else CPU

GPU: Llama-shaped layers (in x out: 4096x4096, 4096x14336, 14336x4096, 8192x8192, 8192x28672),
4-bit, group 128, symmetric, fp16, at M in {1, 4, 16, 64, 256, 2048}. For each: the median time
of our Triton op and of fp16 ``torch.matmul`` on the same shape (``triton.testing.do_bench``),
the bytes our kernel must move (packed weights, scales, zeros, x, y) over its time, TFLOP/s, the
speedup, and the fraction of the device-to-device copy bandwidth measured in the same run. Every
shape is first checked against the reference path (max abs difference in the JSON).

CPU: SmolLM2-135M's layer shapes (and one 4096x4096), 4-bit group 64 and 8-bit per-channel,
at M in {1, 4, 16, 64}: our CPU path (bfloat16 activations, the dtype torch's packed kernels are
fast for) against ``nn.Linear`` in bfloat16 and float32, medians of timed repeats in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
GPU_MS = [1, 4, 16, 64, 256, 2048]
CPU_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (4096, 4096)]
CPU_MS = [1, 4, 16, 64]


def random_layer(k: int, n: int, bits: int, group_size: int, device) -> torch.nn.Module:
    """A QuantLinear with random codes, scales around what real weights give, symmetric."""
    from hfcompress.quantization import LinearFormat, QuantLinear, QuantizedWeight

    groups = 1 if group_size == -1 else -(-k // group_size)
    q = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, device=device)
    scales = (torch.rand(groups, n, device=device) * 0.01 + 0.001).half()
    zeros = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32, device=device)
    g_idx = torch.zeros(k, dtype=torch.int32, device=device) if group_size == -1 else (
        torch.arange(k, device=device, dtype=torch.int32) // group_size)
    qw = QuantizedWeight(q, scales, zeros, g_idx, bits, group_size, True)
    return QuantLinear.from_quantized(qw, None, LinearFormat(bits=bits, group_size=group_size, sym=True))


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), 1 GiB buffers."""
    import triton

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=200)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_gpu(group_size: int) -> dict:
    import triton

    from hfcompress.kernels.ops import quant_matmul_op  # noqa: F401  (registers the op)
    from hfcompress.kernels.quant_matmul import autotune

    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for k, n in GPU_SHAPES:
        layer = random_layer(k, n, 4, group_size, "cuda")
        w16 = layer.dequantize_weight().half()
        weight_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scales, layer.qzeros))
        for m in GPU_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            args = (x, layer.qweight, layer.scales, layer.qzeros, 4, group_size if group_size != -1 else k)
            config = autotune(*args)
            y = torch.ops.hfcompress.quant_matmul(*args)
            error = (y.float() - (x.float() @ w16.float().t())).abs().max().item()
            ours = triton.testing.do_bench(lambda: torch.ops.hfcompress.quant_matmul(*args), rep=100)
            fp16 = triton.testing.do_bench(lambda: torch.matmul(x, w16.t()), rep=100)
            moved = weight_bytes + 2 * (m * k + m * n)
            rows.append({
                "in_features": k, "out_features": n, "M": m, "config": list(config),
                "ours_ms": round(ours, 5), "fp16_ms": round(fp16, 5), "speedup_vs_fp16": round(fp16 / ours, 3),
                "ours_gbs": round(moved / (ours * 1e-3) / 1e9, 1),
                "fraction_of_copy_bandwidth": round(moved / (ours * 1e-3) / 1e9 / copy_gbs, 3),
                "ours_tflops": round(2 * m * n * k / (ours * 1e-3) / 1e12, 2),
                "fp16_tflops": round(2 * m * n * k / (fp16 * 1e-3) / 1e12, 2),
                "max_abs_diff_vs_reference": error,
            })
            print(json.dumps(rows[-1]), flush=True)
        del layer, w16
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": round(copy_gbs, 1),
            "bits": 4, "group_size": group_size, "dtype": "float16", "results": rows}


def _median_seconds(fn, repeats: int, min_time: float = 0.2) -> float:
    fn()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < min_time / 10:
        fn()
        count += 1
    inner = max(1, count)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return statistics.median(samples)


@torch.no_grad()
def bench_cpu(repeats: int) -> dict:
    rows = []
    for k, n in CPU_SHAPES:
        for bits, group_size in ((4, 64), (8, -1)):
            layer = random_layer(k, n, bits, group_size, "cpu")
            kernel = layer.prepare_kernel(torch.device("cpu"))
            w = layer.dequantize_weight()
            fp32 = torch.nn.Linear(k, n, bias=False)
            fp32.weight.copy_(w)
            bf16 = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            bf16.weight.copy_(w)
            for m in CPU_MS:
                x = torch.randn(m, k)
                xb = x.bfloat16()
                t_ours = _median_seconds(lambda: layer(xb), repeats)
                t_bf16 = _median_seconds(lambda: bf16(xb), repeats)
                t_fp32 = _median_seconds(lambda: fp32(x), repeats)
                expected = x @ w.bfloat16().float().t()
                rows.append({
                    "in_features": k, "out_features": n, "bits": bits, "group_size": group_size, "M": m,
                    "kernel": kernel.name if kernel is not None else "reference",
                    "ours_bf16_us": round(t_ours * 1e6, 1), "linear_bf16_us": round(t_bf16 * 1e6, 1),
                    "linear_fp32_us": round(t_fp32 * 1e6, 1), "speedup_vs_bf16": round(t_bf16 / t_ours, 2),
                    "speedup_vs_fp32": round(t_fp32 / t_ours, 2),
                    "max_abs_diff_vs_fp32_sums": (layer(xb).float() - expected).abs().max().item(),
                    "output_scale": expected.abs().max().item(),
                })
                print(json.dumps(rows[-1]), flush=True)
    return {"device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "results": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU path even when a GPU is present")
    parser.add_argument("--group-size", type=int, default=128, help="GPU group size (-1: one per row)")
    parser.add_argument("--repeats", type=int, default=15, help="CPU timing repeats")
    parser.add_argument("--json", help="also write the JSON here")
    args = parser.parse_args()
    result = bench_gpu(args.group_size) if torch.cuda.is_available() and not args.cpu else bench_cpu(args.repeats)
    result["torch"] = torch.__version__
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
