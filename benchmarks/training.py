"""What the healing benchmarks (distill.py, sharing.py) share: the training budget's arguments,
Trainer settings, and runs that survive a stop.

A healing run takes hours on a small CPU machine, so each benchmark keeps every finished phase in
its ``--work`` folder (``results.json``, the trained models, Trainer checkpoints every tenth of the
steps): the same command run again continues where it stopped, a training from its last complete
checkpoint, with the seconds spent reaching it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from common import prepare_checkpoint, write_json

CLOCK_FILE = "training_clock.json"


def add_training_arguments(parser) -> None:
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training budget in tokens")
    parser.add_argument("--skip-tokens", type=int, default=0,
                        help="train on the text after the first N tokens (a continued run sees new text)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--bf16", action="store_true", help="train with bfloat16 autocast")


def prepare(args):
    """The float32 SmolLM2 folder, its tokenizer, WikiText-2 perplexity as ``ppl(model)``, the
    WikiText-2 token ids, and the training blocks of ``austen/``."""
    import logging

    from hfcompress.distillation import packed_dataset
    from hfcompress.data import tokenize
    from hfcompress.evaluation import evaluate_perplexity

    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING)
    checkpoint, tokenizer = prepare_checkpoint(args.work)
    wiki = tokenize(tokenizer, args.data / "wikitext-2-raw" / "wiki.test.raw")

    def ppl(model):
        model.eval()
        return round(evaluate_perplexity(model, tokenizer, wiki, seq_len=2048, max_windows=args.eval_windows).perplexity, 3)

    # The budget is "about --tokens" (distill.py's default asks a little more than the text holds);
    # the protocol string counts the blocks actually trained on.
    text = tokenize(tokenizer, args.data / "austen")[args.skip_tokens:]
    blocks = packed_dataset(tokenizer, text, args.seq_len, max_tokens=args.tokens)
    return checkpoint, tokenizer, ppl, wiki, blocks


def training_arguments(args, output: Path, steps: int, cls):
    return cls(output_dir=str(output), max_steps=steps, per_device_train_batch_size=args.batch_size,
               learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=round(args.warmup * steps),
               weight_decay=0.0, logging_steps=max(1, steps // 20), save_strategy="steps", save_steps=max(1, steps // 10),
               save_total_limit=1, report_to=[], seed=0,
               use_cpu=not torch.cuda.is_available(), bf16=args.bf16, dataloader_num_workers=0)


def training_protocol(args, steps: int) -> str:
    after = f" after its first {args.skip_tokens}" if args.skip_tokens else ""
    return (f"{steps} steps x {args.batch_size} x {args.seq_len} tokens of austen/{after} "
            f"({steps * args.batch_size * args.seq_len} tokens), lr {args.lr} cosine, warmup {args.warmup}, "
            f"{'bf16 autocast' if args.bf16 else 'float32'}")


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


def save_atomically(model, folder: Path, clock: dict | None = None, tokenizer=None) -> None:
    """A model (its training clock, its tokenizer), under its final name only once complete.

    With the tokenizer beside it, ``hfcompress eval FOLDER`` reads the folder as it is.
    """
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if clock is not None:
        (partial / CLOCK_FILE).write_text(json.dumps(clock))
    partial.rename(folder)


class Phases:
    """``results.json`` in the work folder: finished phases are kept while the protocol is the same."""

    def __init__(self, work: Path, protocol: dict):
        self.work, self.state = work, work / "results.json"
        results = json.loads(self.state.read_text()) if self.state.exists() else {}
        protocol = json.loads(json.dumps(protocol))  # as stored: JSON keys are strings (a key 3 reads back as "3")
        self.results = results if results.get("protocol") == protocol else {"protocol": protocol, "models": {}}

    def done(self, name: str) -> bool:
        return name in self.results["models"]

    def record(self, name: str, **entry) -> None:
        self.results["models"][name] = entry
        self.save()
        print(json.dumps({name: entry}), flush=True)

    def save(self) -> None:
        write_json(self.state, self.results)

    def finish(self, json_path: Path | None) -> None:
        """Save the results, print them, and also write them to ``json_path`` when given."""
        self.save()
        print(json.dumps(self.results, indent=2))
        if json_path:
            write_json(json_path, self.results)

    def trained(self, name: str, start, make_trainer):
        """The model trained as ``name`` (from ``start()`` with ``make_trainer(model, output)``), the
        training seconds and the last logged loss; trained only once, resumed after a stop."""
        from transformers import AutoModelForCausalLM

        final = self.work / f"{name}-final"
        if not final.exists():
            student = start().train()
            seconds, loss = train(make_trainer(student, self.work / name), self.work / name)
            save_atomically(student, final, {"train_seconds": seconds, "final_train_loss": loss})
            shutil.rmtree(self.work / name, ignore_errors=True)  # its checkpoints are no longer needed
        student = AutoModelForCausalLM.from_pretrained(final)  # also after a stop between training and evaluation
        clock = json.loads((final / CLOCK_FILE).read_text())
        return student, clock["train_seconds"], clock["final_train_loss"]
