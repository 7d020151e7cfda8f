"""Healing GPTQ with quantization-aware distillation, against cross-entropy on the same parameters.

SmolLM2-135M-Instruct (float32) is quantized with the bundled ``w3g64-gptq`` and ``w4g64-gptq``
recipes, calibrated on ``--samples`` windows of 2048 tokens of ``../shared/data/austen/`` (seed 0).
Each quantized model then trains its group scales (the packed codes stay; the scales train as
their logarithm, ``hfcompress.quantization.trainable``), and with ``--train scales norms`` the
norms' weights too (``codes``: each code may also move one grid step), on the same packed Austen
blocks in the same order, with the same schedule, twice: with ``DistillationTrainer`` from the
float model (forward KL at ``--temperature``: QAD) and with cross-entropy on the text. Then the
trained scales are frozen into the packed format, saved and reloaded, and for each model:
WikiText-2 perplexity (2048-token windows, the whole split unless ``--eval-windows``), weight
bytes on disk, whether the reload gives bit-identical logits, and the training time.

A run takes hours on a small CPU machine; run the same command again after a stop and it
continues where it was (see ``training.py``). ``--start 3=FOLDER`` heals a model an earlier run
saved instead of quantizing one, and ``--skip-tokens`` gives that second run the text after the
first run's. Saved models carry the tokenizer, so ``hfcompress eval FOLDER`` reads them.

    python benchmarks/qad.py --json qad.json     # on the GPU when there is one (--device)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, named_recipes, save_windows, weights_bytes  # noqa: E402
from training import CLOCK_FILE, Phases, add_training_arguments, prepare, save_atomically, train, training_arguments, \
    training_protocol  # noqa: E402

RECIPES = {3: "w3g64-gptq", 4: "w4g64-gptq"}
CODES = "codes (one grid step either way, straight-through rounding, 20x the lr)"
TRAINED = {("scales",): "group scales only (log-parameterized); codes, norms, embeddings frozen",
           ("norms",): "norm weights only; codes, scales, embeddings frozen",
           ("codes",): f"{CODES} only; scales, norms, embeddings frozen",
           ("norms", "scales"): "group scales (log-parameterized) and norm weights; codes, embeddings frozen",
           ("codes", "scales"): f"group scales (log-parameterized) and {CODES}; norms, embeddings frozen",
           ("codes", "norms", "scales"): f"group scales (log-parameterized), {CODES} and norm weights; embeddings frozen"}


def parse_args():
    parser = base_parser(__doc__, "qad-run")
    add_training_arguments(parser)
    parser.set_defaults(lr=1e-3)  # a relative step of the scales (they train as their logarithm)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4], choices=sorted(RECIPES))
    parser.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows of 2048 tokens")
    parser.add_argument("--recipe", action="append", default=[], metavar="BITS=RECIPE",
                        help="quantize the BITS-bit model with this recipe (a bundled name or a YAML file) instead "
                             "of the bundled GPTQ one; use a --work of its own per recipe")
    parser.add_argument("--start", action="append", default=[], metavar="BITS=FOLDER",
                        help="heal this saved BITS-bit model (one a run of this script saved, say) instead of "
                             "quantizing one; with --skip-tokens, a continued run trains on new text")
    parser.add_argument("--skip-ce", action="store_true", help="train with QAD only, not the cross-entropy baseline")
    parser.add_argument("--train", nargs="+", default=["scales"], choices=["scales", "norms", "codes"],
                        help="what trains: the group scales, and with them the norms' weights and the codes' "
                             "rounding (as a recipe's distill stage takes train: [scales, codes, norms])")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where GPTQ, training and evaluation run (Trainer takes the GPU when there is one)")
    args = parser.parse_args()
    args.recipes = dict(RECIPES)
    for bits, recipe in named_recipes(parser, args.recipe).items():
        if not bits.isdigit() or int(bits) not in RECIPES:
            parser.error(f"--recipe {bits}={recipe}: BITS is one of {sorted(RECIPES)}")
        args.recipes[int(bits)] = recipe
    args.starts = {}
    for item in args.start:
        bits, _, folder = item.partition("=")
        if not bits.isdigit() or int(bits) not in RECIPES or not (Path(folder) / "config.json").is_file():
            parser.error(f"--start {item}: expected BITS=FOLDER, BITS one of {sorted(RECIPES)} and FOLDER a saved model")
        args.starts[int(bits)] = Path(folder).resolve()
    return args


def protocol_of(args, steps: int) -> dict:
    return {
        "teacher": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "quantized": {bits: f"saved model {args.starts[bits]}" if bits in args.starts else
                      f"recipe {args.recipes[bits]}, {args.samples} x 2048 austen/ windows (seed 0)"
                      for bits in args.bits},
        "trained": TRAINED[tuple(sorted(set(args.train)))],
        "training": training_protocol(args, steps),
        "qad": f"DistillationTrainer from the float model, forward KL, temperature {args.temperature}",
        "ce": "DistillationTrainer with the cross-entropy term only (no teacher)",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch_threads": torch.get_num_threads()}


def main():
    import hfcompress
    from hfcompress.distillation import DistillationTrainer, DistillationTrainingArguments
    from hfcompress.distillation.stage import make_trainable
    from hfcompress.quantization.trainable import freeze_scales
    from transformers import AutoModelForCausalLM

    args = parse_args()
    checkpoint, tokenizer, wiki_ppl, wiki, blocks = prepare(args)
    device = torch.device(args.device)

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder).to(device)

    def ppl(model):
        return wiki_ppl(model.to(device))

    steps = len(blocks) // args.batch_size
    protocol = protocol_of(args, steps)
    phases = Phases(args.work, protocol)  # a stopped run continues where it was
    teacher = load(checkpoint).eval()
    probe = wiki[: 2 * 256].view(2, 256).to(device)  # logits compared after save and reload

    def quantized_folder(bits: int) -> Path:
        if bits in args.starts:
            return args.starts[bits]
        folder = args.work / f"gptq-w{bits}"
        if not folder.exists():
            windows = save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0,
                                   args.work / "windows.safetensors")
            model = AutoModelForCausalLM.from_pretrained(checkpoint)
            hfcompress.compress(model, args.recipes[bits], calibration_data=windows, device=device)
            save_atomically(model, folder, tokenizer=tokenizer)
        return folder

    def heal(name: str, bits: int, distill: bool):
        """Train the scales (and norms) of the w{bits} model (QAD or CE), freeze them, save, reload."""
        final = args.work / f"{name}-final"
        if not final.exists():
            student = AutoModelForCausalLM.from_pretrained(quantized_folder(bits))
            trainable = make_trainable(student, args.train)
            options = training_arguments(args, args.work / name, steps, DistillationTrainingArguments)
            options.temperature = args.temperature
            options.kl_weight, options.ce_weight = (1.0, 0.0) if distill else (0.0, 1.0)
            trainer = DistillationTrainer(student.train(), options, teacher_model=teacher, train_dataset=blocks)
            seconds, loss = train(trainer, args.work / name)
            freeze_scales(student.eval())
            with torch.no_grad():
                logits = student(probe).logits
            save_atomically(student, final, {"train_seconds": seconds, "final_train_loss": loss,
                                             "trained_values": trainable}, tokenizer)
            reloaded = load(final).eval()
            with torch.no_grad():
                identical = torch.equal(reloaded(probe).logits, logits)
            clock = json.loads((final / CLOCK_FILE).read_text())
            (final / CLOCK_FILE).write_text(json.dumps({**clock, "reload_bit_identical": identical}))
            shutil.rmtree(args.work / name, ignore_errors=True)  # its checkpoints are no longer needed
        if not phases.done(name):
            clock = json.loads((final / CLOCK_FILE).read_text())
            phases.record(name, wikitext2_ppl=ppl(load(final)),
                          weight_bytes=weights_bytes(final), **clock)

    if not phases.done("teacher"):
        phases.record("teacher", wikitext2_ppl=ppl(teacher))
    for bits in args.bits:
        name = f"gptq-w{bits}"
        if not phases.done(name):
            folder = quantized_folder(bits)
            phases.record(name, wikitext2_ppl=ppl(load(folder)),
                          weight_bytes=weights_bytes(folder))
        heal(f"qad-w{bits}", bits, distill=True)
        if not args.skip_ce:
            heal(f"ce-w{bits}", bits, distill=False)

    results = phases.results
    m = results["models"]
    results["gap_closed"] = {}
    for bits in args.bits:
        gap = m[f"gptq-w{bits}"]["wikitext2_ppl"] - m["teacher"]["wikitext2_ppl"]
        results["gap_closed"][f"w{bits}"] = {
            method: round((m[f"gptq-w{bits}"]["wikitext2_ppl"] - m[f"{method}-w{bits}"]["wikitext2_ppl"]) / gap, 4)
            for method in ("qad", "ce") if f"{method}-w{bits}" in m}
    phases.finish(args.json)


if __name__ == "__main__":
    main()
