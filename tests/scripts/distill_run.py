"""A short distillation run on tiny models, for the multi-process test: one process, or several
under ``accelerate launch``. Writes the logged losses and the final weights' checksum as JSON."""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_llama  # noqa: E402

import hfcompress  # noqa: E402
from hfcompress.distillation import DistillationTrainer, DistillationTrainingArguments, PackedBlocks  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    teacher = tiny_llama()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(5)
    student = copy.deepcopy(teacher)
    hfcompress.compress(student, {"stages": [{"prune": {"heads": 3, "ffn": 0.5, "importance": "magnitude"}}]})
    ids = torch.randint(0, 300, (64 * 32,), generator=torch.Generator().manual_seed(0))
    training = DistillationTrainingArguments(
        output_dir=str(args.output.parent / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=1e-3, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = DistillationTrainer(student, training, teacher_model=teacher, train_dataset=PackedBlocks(ids, 32))
    trainer.train()
    if trainer.is_world_process_zero():
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        args.output.write_text(json.dumps({"losses": losses, "processes": trainer.args.world_size,
                                           "weights_sum": float(weights.double().sum()),
                                           "weights_abs_sum": float(weights.double().abs().sum())}))


if __name__ == "__main__":
    main()
