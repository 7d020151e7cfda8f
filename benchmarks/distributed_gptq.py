"""GPTQ calibration over two processes against one, on SmolLM2 (float32 safetensors).

One run of ``hfcompress compress`` in one process, one under ``accelerate launch --multi_gpu
--num_processes 2`` (gloo on this CPU machine), the same recipe and calibration windows (Austen); prints the wall time
and peak RSS of each, whether the output files are identical (sha256), and, when they are not,
the WikiText-2 perplexity of both (the acceptance tolerance: equal to 3 digits).

    python benchmarks/distributed_gptq.py --json distributed.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, measure, prepare_checkpoint, python, save_windows, write_json  # noqa: E402
from layerwise_memory import digests  # noqa: E402


def main():
    parser = base_parser(__doc__, "distributed")
    parser.add_argument("--recipe", default="w4g64-gptq")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint, tokenizer = prepare_checkpoint(args.work)
    windows = args.work / "windows.safetensors"
    save_windows(tokenizer, args.data / "austen", 32, 2048, 0, windows)
    common = ["compress", str(checkpoint), "--recipe", args.recipe, "--no-eval", "--dtype", "float32",
              "--calibration-data", str(windows), "--overwrite"]
    runs = {
        "one_process": [python(), "-m", "hfcompress.cli", *common, "--output", str(args.work / "one" / "out")],
        f"{args.processes}_processes": [
            # --multi_gpu starts the processes through torch.distributed.run (on a machine without
            # GPUs hfcompress joins them with gloo); accelerate's --cpu starts one unless mpirun is set up.
            str(Path(python()).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(args.processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "hfcompress.cli", *common, "--output", str(args.work / "many" / "out")],
    }
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.processes))}  # the same cores in all
    results: dict = {"recipe": args.recipe, "calibration": "32 Austen windows x 2048 tokens"}
    for name, cmd in runs.items():
        result = measure(cmd, args.work / f"{name}.log", env=None if name == "one_process" else threads)
        result["peak_rss_gb"] = round(result.pop("peak_rss_bytes") / 1e9, 3)
        results[name] = result
        print(json.dumps({name: result}), flush=True)
    one, many = digests(args.work / "one" / "out"), digests(args.work / "many" / "out")
    results["identical_sha256"] = one == many
    if one != many:
        results["differing_files"] = sorted(k for k in one if one.get(k) != many.get(k))
        for name, folder in (("one_process", "one"), ("many", "many")):
            out = args.work / f"{folder}-ppl.json"
            cmd = [python(), "-m", "hfcompress.cli", "eval", str(args.work / folder / "out"), "--data",
                   str(args.data / "wikitext-2-raw" / "wiki.test.raw"), "--json", str(out)]
            if args.eval_windows:
                cmd += ["--max-windows", str(args.eval_windows)]
            measure(cmd, args.work / f"{folder}-eval.log")
            results[f"{name}_wikitext2_ppl"] = json.loads(out.read_text())["perplexity"]
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
