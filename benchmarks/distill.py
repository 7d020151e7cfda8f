"""Healing a pruned SmolLM2: distillation against plain cross-entropy fine-tuning, same budget.

The student is SmolLM2-135M-Instruct with FFN 25% and heads 9 -> 6 pruned (activation importance,
the pruning benchmark's model), the teacher the unpruned model. Both trainings see the same
packed blocks of ``../shared/data/austen/`` in the same order (about ``--tokens`` tokens), with
the same learning-rate schedule: once with ``DistillationTrainer`` (forward KL at
``--temperature``), once with ``transformers.Trainer`` on the language-modelling loss. Then
WikiText-2 perplexity (2048-token windows, the whole split unless ``--eval-windows``) of the
teacher, the pruned, the fine-tuned and the distilled models, and the training wall times.

A run takes hours on a small CPU machine; run the same command again after a stop and it
continues where it was (see ``training.py``).

    python benchmarks/distill.py --json distill.json
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, save_windows  # noqa: E402
from training import (Phases, add_training_arguments, prepare, save_atomically, training_arguments,  # noqa: E402
                      training_protocol)


def parse_args():
    parser = base_parser(__doc__, "distill-run")
    add_training_arguments(parser)
    parser.add_argument("--samples", type=int, default=32, help="calibration windows for the pruning importance")
    return parser.parse_args()


def main():
    args = parse_args()
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hfcompress
    from hfcompress.distillation import DistillationTrainer, DistillationTrainingArguments

    checkpoint, tokenizer, ppl, _, blocks = prepare(args)
    steps = len(blocks) // args.batch_size
    protocol = {
        "teacher": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "student": "teacher pruned: heads 9 -> 6 (gqa groups), FFN 25%, activation importance",
        "training": training_protocol(args, steps),
        "distillation": f"forward KL, temperature {args.temperature}",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads()}
    phases = Phases(args.work, protocol)  # a stopped run continues where it was
    teacher = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    pruned_folder = args.work / "pruned"
    if not pruned_folder.exists():
        windows = save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0, args.work / "windows.safetensors")
        pruned = hfcompress.compress(copy.deepcopy(teacher), {"stages": [{"prune": {"heads": 0.3334, "ffn": 0.25}}]},
                                     calibration_data=windows)
        save_atomically(pruned, pruned_folder)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder)

    def heal(name, make_trainer):
        if not phases.done(name):
            student, seconds, loss = phases.trained(name, lambda: copy.deepcopy(pruned), make_trainer)
            phases.record(name, wikitext2_ppl=ppl(student), train_seconds=seconds, final_train_loss=loss)

    def distiller(student, output):
        distill_args = training_arguments(args, output, steps, DistillationTrainingArguments)
        distill_args.temperature = args.temperature
        return DistillationTrainer(student, distill_args, teacher_model=teacher, train_dataset=blocks)

    heal("distilled", distiller)
    heal("finetuned_ce", lambda student, output: Trainer(
        student, training_arguments(args, output, steps, TrainingArguments), train_dataset=blocks))
    if not phases.done("pruned"):
        phases.record("pruned", wikitext2_ppl=ppl(pruned), parameters=sum(p.numel() for p in pruned.parameters()))
    if not phases.done("teacher"):
        phases.record("teacher", wikitext2_ppl=ppl(teacher), parameters=sum(p.numel() for p in teacher.parameters()))

    results = phases.results
    m = results["models"]
    gap = m["pruned"]["wikitext2_ppl"] - m["teacher"]["wikitext2_ppl"]
    results["gap_recovered"] = {
        name: round((m["pruned"]["wikitext2_ppl"] - m[name]["wikitext2_ppl"]) / gap, 4)
        for name in ("finetuned_ce", "distilled")}
    phases.finish(args.json)


if __name__ == "__main__":
    main()
