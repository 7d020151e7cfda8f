"""Healing a pruned SmolLM2: distillation against plain cross-entropy fine-tuning, same budget.

The student is SmolLM2-135M-Instruct with FFN 25% and heads 9 -> 6 pruned (activation importance,
the pruning benchmark's model), the teacher the unpruned model. Both trainings see the same
packed blocks of ``../shared/data/austen/`` in the same order (about ``--tokens`` tokens), with
the same learning-rate schedule: once with ``DistillationTrainer`` (forward KL at
``--temperature``), once with ``transformers.Trainer`` on the language-modelling loss. Then
WikiText-2 perplexity (2048-token windows, the whole split unless ``--eval-windows``) of the
teacher, the pruned, the fine-tuned and the distilled models, and the training wall times.

    python benchmarks/distill.py --json distill.json
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, prepare_checkpoint, save_windows, write_json  # noqa: E402


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
               weight_decay=0.0, logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=0,
               use_cpu=not torch.cuda.is_available(), bf16=args.bf16, dataloader_num_workers=0)


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
    results: dict = {"protocol": {
        "teacher": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "student": "teacher pruned: heads 9 -> 6 (gqa groups), FFN 25%, activation importance",
        "training": f"{steps} steps x {args.batch_size} x {args.seq_len} tokens of austen/ "
                    f"({steps * args.batch_size * args.seq_len} tokens), lr {args.lr} cosine, warmup {args.warmup}, "
                    f"{'bf16 autocast' if args.bf16 else 'float32'}",
        "distillation": f"forward KL, temperature {args.temperature}",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads()}, "models": {}}

    def record(name, **entry):
        results["models"][name] = entry
        print(json.dumps({name: entry}), flush=True)

    teacher = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    record("teacher", wikitext2_ppl=ppl(teacher))
    windows = save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0, args.work / "windows.safetensors")
    pruned = hfcompress.compress(copy.deepcopy(teacher), {"stages": [{"prune": {"heads": 0.3334, "ffn": 0.25}}]},
                                 calibration_data=windows)
    record("pruned", wikitext2_ppl=ppl(pruned), parameters=sum(p.numel() for p in pruned.parameters()))

    student = copy.deepcopy(pruned).train()
    start = time.perf_counter()
    trainer = Trainer(student, training_arguments(args, args.work / "finetune", steps, TrainingArguments),
                      train_dataset=blocks)
    trainer.train()
    record("finetuned_ce", wikitext2_ppl=ppl(student), train_seconds=round(time.perf_counter() - start, 1),
           final_train_loss=trainer.state.log_history[-2].get("loss"))
    del student, trainer

    student = copy.deepcopy(pruned).train()
    start = time.perf_counter()
    distill_args = training_arguments(args, args.work / "distill", steps, DistillationTrainingArguments)
    distill_args.temperature = args.temperature
    trainer = DistillationTrainer(student, distill_args, teacher_model=teacher, train_dataset=blocks)
    trainer.train()
    record("distilled", wikitext2_ppl=ppl(student), train_seconds=round(time.perf_counter() - start, 1),
           final_train_loss=trainer.state.log_history[-2].get("loss"))

    m = results["models"]
    gap = m["pruned"]["wikitext2_ppl"] - m["teacher"]["wikitext2_ppl"]
    results["gap_recovered"] = {
        name: round((m["pruned"]["wikitext2_ppl"] - m[name]["wikitext2_ppl"]) / gap, 4)
        for name in ("finetuned_ce", "distilled")}
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
