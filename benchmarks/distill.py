"""Healing a pruned SmolLM2: distillation against plain cross-entropy fine-tuning, same budget.

The student is SmolLM2-135M-Instruct with FFN 25% and heads 9 -> 6 pruned (activation importance,
the pruning benchmark's model), the teacher the unpruned model. Both trainings see the same
packed blocks of ``../shared/data/austen/`` in the same order (about ``--tokens`` tokens), with
the same learning-rate schedule: once with ``DistillationTrainer`` (forward KL at
``--temperature``), once with ``transformers.Trainer`` on the language-modelling loss. Then
WikiText-2 perplexity (2048-token windows, the whole split unless ``--eval-windows``) of the
teacher, the pruned, the fine-tuned and the distilled models, and the training wall times.

A run takes hours on a small CPU machine, so it keeps every finished phase in ``--work``
(``results.json``, the pruned and trained models, Trainer checkpoints every tenth of the steps):
run the same command again after a stop and it continues from there, the trainings resuming
from their last checkpoint with the seconds spent reaching it.

    python benchmarks/distill.py --json distill.json
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, prepare_checkpoint, save_windows, write_json  # noqa: E402

CLOCK_FILE = "training_clock.json"


def parse_args():
    parser = base_parser(__doc__, "distill-run")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training budget in tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="train with bfloat16 autocast")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows for the pruning importance")
    return parser.parse_args()


def training_arguments(args, output: Path, steps: int, cls):
    return cls(output_dir=str(output), max_steps=steps, per_device_train_batch_size=args.batch_size,
               learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=round(args.warmup * steps),
               weight_decay=0.0, logging_steps=max(1, steps // 20), save_strategy="steps", save_steps=max(1, steps // 10),
               save_total_limit=1, report_to=[], seed=0,
               use_cpu=not torch.cuda.is_available(), bf16=args.bf16, dataloader_num_workers=0)


class _TrainingClock(TrainerCallback):
    """Training seconds that survive a resume: each checkpoint stores the seconds spent reaching it."""

    def __init__(self, prior: float):
        self.prior, self.start = prior, time.perf_counter()

    def seconds(self) -> float:
        return self.prior + time.perf_counter() - self.start

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (folder / CLOCK_FILE).write_text(json.dumps({"train_seconds": self.seconds()}))


def train(trainer, output: Path) -> tuple[float, float | None]:
    """Train, resuming from the last checkpoint in ``output`` if an earlier run was stopped."""
    # The clock file is written after everything else in a checkpoint: a run killed while saving
    # leaves a checkpoint without it, which must not be resumed from.
    complete = [c for c in output.glob("checkpoint-*") if (c / CLOCK_FILE).exists()] if output.is_dir() else []
    last = str(max(complete, key=lambda c: int(c.name.split("-")[1]))) if complete else None
    prior = json.loads((Path(last) / CLOCK_FILE).read_text())["train_seconds"] if last else 0.0
    if last:
        print(f"resuming {output.name} from {last}", flush=True)
    clock = _TrainingClock(prior)
    trainer.add_callback(clock)
    trainer.train(resume_from_checkpoint=last)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return round(clock.seconds(), 1), losses[-1] if losses else None


def save_atomically(model, folder: Path, clock: dict) -> None:
    """The trained model and its training clock, under their final name only once complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    (partial / CLOCK_FILE).write_text(json.dumps(clock))
    partial.rename(folder)


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hfcompress
    from hfcompress.distillation import DistillationTrainer, DistillationTrainingArguments, packed_dataset
    from hfcompress.evaluation import evaluate_perplexity, tokenize

    checkpoint, tokenizer = prepare_checkpoint(args.work)
    wiki = tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")

    def ppl(model):
        model.eval()
        return round(evaluate_perplexity(model, tokenizer, wiki, seq_len=2048, max_windows=args.eval_windows).perplexity, 3)

    blocks = packed_dataset(tokenizer, args.data / "austen", args.seq_len, max_tokens=args.tokens)
    steps = len(blocks) // args.batch_size
    protocol = {
        "teacher": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "student": "teacher pruned: heads 9 -> 6 (gqa groups), FFN 25%, activation importance",
        "training": f"{steps} steps x {args.batch_size} x {args.seq_len} tokens of austen/ "
                    f"({steps * args.batch_size * args.seq_len} tokens), lr {args.lr} cosine, warmup {args.warmup}, "
                    f"{'bf16 autocast' if args.bf16 else 'float32'}",
        "distillation": f"forward KL, temperature {args.temperature}",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads()}
    # Every finished phase is kept in the work folder, so a stopped run continues where it was
    # (the trainings from their last checkpoint) instead of starting a multi-hour job again.
    state = args.work / "results.json"
    results = json.loads(state.read_text()) if state.exists() else {}
    if results.get("protocol") != protocol:
        results = {"protocol": protocol, "models": {}}

    def record(name, **entry):
        results["models"][name] = entry
        write_json(state, results)
        print(json.dumps({name: entry}), flush=True)

    teacher = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    pruned_folder = args.work / "pruned"
    if not pruned_folder.exists():
        windows = save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0, args.work / "windows.safetensors")
        pruned = hfcompress.compress(copy.deepcopy(teacher), {"stages": [{"prune": {"heads": 0.3334, "ffn": 0.25}}]},
                                     calibration_data=windows)
        partial = pruned_folder.with_name("pruned.partial")
        shutil.rmtree(partial, ignore_errors=True)
        pruned.save_pretrained(partial)
        partial.rename(pruned_folder)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_folder)

    def heal(name, make_trainer):
        if name in results["models"]:
            return
        final = args.work / f"{name}-final"
        if not final.exists():
            student = copy.deepcopy(pruned).train()
            seconds, loss = train(make_trainer(student, args.work / name), args.work / name)
            save_atomically(student, final, {"train_seconds": seconds, "final_train_loss": loss})
            shutil.rmtree(args.work / name, ignore_errors=True)  # its checkpoints are no longer needed
        student = AutoModelForCausalLM.from_pretrained(final)  # also after a stop between training and evaluation
        clock = json.loads((final / CLOCK_FILE).read_text())
        seconds, loss = clock["train_seconds"], clock["final_train_loss"]
        record(name, wikitext2_ppl=ppl(student), train_seconds=seconds, final_train_loss=loss)

    def distiller(student, output):
        distill_args = training_arguments(args, output, steps, DistillationTrainingArguments)
        distill_args.temperature = args.temperature
        return DistillationTrainer(student, distill_args, teacher_model=teacher, train_dataset=blocks)

    heal("distilled", distiller)
    heal("finetuned_ce", lambda student, output: Trainer(
        student, training_arguments(args, output, steps, TrainingArguments), train_dataset=blocks))
    if "pruned" not in results["models"]:
        record("pruned", wikitext2_ppl=ppl(pruned), parameters=sum(p.numel() for p in pruned.parameters()))
    if "teacher" not in results["models"]:
        record("teacher", wikitext2_ppl=ppl(teacher), parameters=sum(p.numel() for p in teacher.parameters()))

    m = results["models"]
    gap = m["pruned"]["wikitext2_ppl"] - m["teacher"]["wikitext2_ppl"]
    results["gap_recovered"] = {
        name: round((m["pruned"]["wikitext2_ppl"] - m[name]["wikitext2_ppl"]) / gap, 4)
        for name in ("finetuned_ce", "distilled")}
    write_json(state, results)
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
