"""GPTQ settings compared layer by layer on SmolLM2, without a whole-model run: each linear's
relative output error on held-out text, under each ``shrink:damp[:mse_grow]`` variant.

The Hessians come from one forward pass of the float model: the calibration windows (Austen,
seed 0) and two held-out sets, other Austen windows (seed 1) and the last windows of a second
text (``--other``, e.g. the KJV text of benchmarks/README.md, whose first windows the KJV check
reads). The first token of each held-out window (SmolLM2's attention sink, whose hidden state is
about 180 times the others' from block 11 on) is kept apart, so that the error on the other
tokens is reported by itself too. Each variant quantizes every chosen linear from the
calibration Hessian (float inputs: no error carried from earlier layers) and reports
``tr(dW H dW^T) / tr(W H W^T)`` on each held-out Hessian, and the geometric mean over layers of
each variant's error relative to the first variant's.

    python benchmarks/gptq_layer_errors.py --other kjv.txt --bits 3 --variants 0.5:0.01,0.25:0.01,0:0.01
    python benchmarks/gptq_layer_errors.py --other kjv.txt --bits 3 --blocks 2,11 --variants 0.5:0.01,0.5:0.01:1.17
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, prepare_checkpoint  # noqa: E402

# One linear per distinct input (k/v read q's input, up reads gate's): their Hessians are the same.
KINDS = {"q": "self_attn.q_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "down": "mlp.down_proj"}


def parse_args():
    parser = base_parser(__doc__, "gptq-layer-errors")
    parser.add_argument("--other", type=Path, required=True, help="a second held-out text (its last windows)")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--blocks", default="0,3,6,9,11,12,15,18,21,24,27,28,29")
    parser.add_argument("--variants", default="0.5:0.01,0.25:0.01,0:0.01,0.75:0.01",
                        help="shrink:damp[:mse_grow],... (mse_grow: 1 unless given)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows of 2048 tokens")
    parser.add_argument("--held", type=int, default=4, help="held-out windows of each text")
    return parser.parse_args()


def hessians(model, names: dict[str, str], sets: dict[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """``{(key, part): X^T X}`` for each linear of ``names`` over each window set; held-out sets
    (every set but ``calib``) in two parts, the first token (``sink``) and the rest (``rest``)."""
    found: dict[tuple[str, str], torch.Tensor] = {}
    current = [""]

    def add(key: str, part: str, x: torch.Tensor) -> None:
        H = found.setdefault((key, part), torch.zeros(x.shape[-1], x.shape[-1]))
        H.addmm_(x.t(), x)

    def hook(key):
        def take(module, args, output):
            x = args[0][0].float()
            if current[0] == "calib":
                add(key, "calib", x)
            else:
                add(key, f"{current[0]}.sink", x[:1])
                add(key, f"{current[0]}.rest", x[1:])
        return take

    handles = [model.get_submodule(name).register_forward_hook(hook(key)) for key, name in names.items()]
    try:
        for label, windows in sets.items():
            current[0] = label
            for window in windows:
                model(input_ids=window[None])
    finally:
        for handle in handles:
            handle.remove()
    return found


def variant_of(item: str) -> tuple[float, float, float]:
    """``shrink:damp`` or ``shrink:damp:mse_grow`` -> ``(shrink, damp, mse_grow)``."""
    shrink, damp, grow = (item + ":1").split(":")[:3]
    return float(shrink), float(damp), float(grow)


def label(variant: tuple[float, float, float]) -> str:
    shrink, damp, grow = variant
    return f"shrink {shrink} damp {damp}" + (f" mse_grow {grow}" if grow != 1 else "")


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM

    from hfcompress.calibration import calibration_windows
    from hfcompress.data import tokenize
    from hfcompress.quantization.gptq import gptq_quantize, relative_error

    torch.set_grad_enabled(False)
    checkpoint, tokenizer = prepare_checkpoint(args.work)
    austen = args.data / "austen"
    other = tokenize(tokenizer, args.other)
    n = other.numel() // 2048
    sets = {"calib": calibration_windows(tokenizer, austen, args.samples, 2048, 0),
            "austen": calibration_windows(tokenizer, austen, args.held, 2048, 1),
            "other": other[(n - args.held) * 2048 : n * 2048].view(args.held, 2048)}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    blocks = [int(b) for b in args.blocks.split(",")]
    names = {f"{b}.{kind}": f"model.layers.{b}.{name}" for b in blocks for kind, name in KINDS.items()}
    H = hessians(model, names, sets)
    variants = [variant_of(item) for item in args.variants.split(",")]
    errors: dict[str, dict[tuple, dict[str, float]]] = defaultdict(dict)
    for key, name in names.items():
        W = model.get_submodule(name).weight
        for shrink, damp, grow in variants:
            q = gptq_quantize(W, H[key, "calib"], args.bits, args.group_size, True, damp=damp, shrink=shrink,
                              act_order=True, static_groups=True, mse=True, mse_grow=grow, measure=False).weight
            row = {held: relative_error(W, q, H[key, f"{held}.sink"] + H[key, f"{held}.rest"]) for held in ("austen", "other")}
            row.update({f"{held}_rest": relative_error(W, q, H[key, f"{held}.rest"]) for held in ("austen", "other")})
            errors[key][shrink, damp, grow] = row
            print(json.dumps({"layer": key, "shrink": shrink, "damp": damp, "mse_grow": grow, **row}), flush=True)
    summary = {}
    first = variants[0]
    for variant in variants:
        for kind in [*KINDS, "all"]:
            keys = [k for k in errors if kind == "all" or k.endswith(f".{kind}")]
            summary[f"{label(variant)} {kind}"] = {
                metric: round(math.exp(sum(math.log(errors[k][variant][metric] / errors[k][first][metric]) for k in keys)
                                       / len(keys)), 4)
                for metric in ("austen", "other", "austen_rest", "other_rest")}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"layers": {k: {":".join(map(str, variant)): v for variant, v in e.items()}
                                                    for k, e in errors.items()},
                                         "relative_to_first": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
