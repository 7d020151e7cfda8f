"""QLoRA on a GPTQ model against the same LoRA on the bfloat16 model: loss, memory, adapters.

SmolLM2-135M-Instruct is quantized with the bundled ``w4g64-gptq`` recipe (calibrated on
``--samples`` windows of 2048 tokens of ``../shared/data/austen/``, seed 0). Then, each in a process
of its own (so that its peak resident memory is its own, read with wait4): LoRA of rank
``--rank`` on every linear layer (peft, ``target_modules="all-linear"``, alpha twice the rank),
``--steps`` steps of ``--batch-size`` x ``--seq-len`` Austen tokens with ``transformers.Trainer``
(lr ``--lr``, cosine, 5% warmup), once on the packed model loaded in bfloat16 (QLoRA) and once on
the float model in bfloat16. Each saves its adapter; the QLoRA one is reloaded onto a freshly
loaded compressed base and must give identical logits. Reported: first and last logged losses,
training seconds, peak RSS of each process and their ratio.

    python benchmarks/qlora.py --json qlora.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, measure, prepare_checkpoint, save_windows  # noqa: E402
from training import Phases, save_atomically  # noqa: E402

RUNS = ("qlora", "bf16_lora")


def parse_args():
    parser = base_parser(__doc__, "qlora-run")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows of 2048 tokens")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # a child process's run, set by the parent
    return parser.parse_args()


def quantized_base(args, checkpoint: Path, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    import hfcompress

    folder = args.work / "gptq-w4"
    if not folder.exists():
        windows = save_windows(tokenizer, args.data / "austen", args.samples, 2048, 0, args.work / "windows.safetensors")
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        hfcompress.compress(model, "w4g64-gptq", calibration_data=windows)
        save_atomically(model, folder)
    return folder


def child(args) -> None:
    """One training run (``args.run``), in this process; writes ``<run>.json`` in the work folder."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

    import hfcompress  # noqa: F401  (reads the packed folder, and lets peft wrap packed layers)
    from hfcompress.distillation import packed_dataset

    checkpoint = args.work / "smollm2-float32"  # written by the parent: nothing else is loaded here
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = args.work / "gptq-w4" if args.run == "qlora" else checkpoint
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules="all-linear"))
    blocks = packed_dataset(tokenizer, args.data / "austen", args.seq_len,
                            max_tokens=args.steps * args.batch_size * args.seq_len)
    output = args.work / args.run
    options = TrainingArguments(output_dir=str(output), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                                learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=round(0.05 * args.steps),
                                logging_steps=max(1, args.steps // 20), save_strategy="no", report_to=[], seed=0,
                                use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model, options, train_dataset=blocks, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.save_pretrained(output / "adapter")
    result = {"first_loss": losses[0], "last_loss": losses[-1], "losses": losses, "train_seconds": round(seconds, 1),
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if args.run == "qlora":
        probe = blocks[0]["input_ids"][None]
        model.eval()
        with torch.no_grad():
            trained = model(probe).logits
        fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        reloaded = peft.PeftModel.from_pretrained(fresh, output / "adapter").eval()
        with torch.no_grad():
            result["reload_identical_logits"] = torch.equal(reloaded(probe).logits, trained)
    (args.work / f"{args.run}.json").write_text(json.dumps(result))


def main():
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.run:
        return child(args)
    checkpoint, tokenizer = prepare_checkpoint(args.work)
    quantized_base(args, checkpoint, tokenizer)
    protocol = {"model": "SmolLM2-135M-Instruct (bundled GGUF), loaded in bfloat16",
                "quantized": f"recipe w4g64-gptq, {args.samples} x 2048 austen/ windows (seed 0)",
                "lora": f"rank {args.rank}, alpha {2 * args.rank}, all-linear (peft)",
                "training": f"{args.steps} steps x {args.batch_size} x {args.seq_len} austen/ tokens, lr {args.lr} "
                            "cosine, 5% warmup, Trainer on CPU",
                "torch_threads": torch.get_num_threads()}
    phases = Phases(args.work, protocol)
    settings = ["--work", args.work, "--data", args.data, "--steps", args.steps, "--batch-size", args.batch_size,
                "--seq-len", args.seq_len, "--rank", args.rank, "--lr", args.lr]
    for run in RUNS:
        if not phases.done(run):
            command = [sys.executable, __file__, *map(str, settings), "--run", run]
            usage = measure(command, args.work / f"{run}.log")
            phases.record(run, **json.loads((args.work / f"{run}.json").read_text()), **usage)
    m = phases.results["models"]
    phases.results["peak_rss_qlora_over_bf16_lora"] = round(m["qlora"]["peak_rss_bytes"] / m["bf16_lora"]["peak_rss_bytes"], 3)
    phases.finish(args.json)


if __name__ == "__main__":
    main()
