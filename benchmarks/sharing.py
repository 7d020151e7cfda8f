"""Weight sharing on SmolLM2: adjacent layers that share their MLP, healed by distillation; and the
tied embeddings kept through prune -> distill -> GPTQ -> save -> reload -> export.

Heal (skip with ``--skip-heal``): every two adjacent decoder layers (0-1, 2-3, ..., 28-29) share
their MLP, the first layer's (``--init``); the folder is saved and reloaded (identical logits,
one module per pair); then distilled from the unshared model with the budget and schedule of
``distill.py`` (about ``--tokens`` tokens of ``../shared/data/austen/``, forward KL). Reported:
parameters stored and as used, safetensors bytes against the original and against the bytes of the
removed duplicates, WikiText-2 perplexity (2048-token windows, the whole split unless
``--eval-windows``) before and after healing, training wall time.

Tied (skip with ``--skip-tied``): SmolLM2 (tied embeddings) through one recipe, prune (heads 9 -> 6,
FFN 25%) -> distill (a few steps) -> GPTQ 4-bit g64, saved, reloaded (identical logits, lm_head and
the embeddings one tensor), exported to compressed-tensors and GPTQ v1 and read back by their
readers (``export_readers.py``: transformers + compressed-tensors, GPTQModel in its own venv), each
reporting whether its loaded model ties lm_head to the embeddings.

A run takes hours on a small CPU machine; run the same command again after a stop and it
continues where it was (see ``training.py``).

    python benchmarks/sharing.py --bf16 --json sharing.json
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, base_parser, python, tensor_bytes, weights_bytes, write_json  # noqa: E402
from training import (Phases, add_training_arguments, prepare, save_atomically, training_arguments,  # noqa: E402
                      training_protocol)



def parse_args():
    parser = base_parser(__doc__, "sharing-run")
    add_training_arguments(parser)
    parser.add_argument("--init", default="0",
                        help="mean, or the position of the member whose MLP the pair keeps (default 0: on SmolLM2's "
                             "first two WikiText-2 windows, before healing, perplexity 6.5e5 against 8.6e6 for the mean)")
    parser.add_argument("--skip-heal", action="store_true")
    parser.add_argument("--skip-tied", action="store_true")
    parser.add_argument("--tied-distill-steps", type=int, default=8)
    parser.add_argument("--tied-samples", type=int, default=16, help="GPTQ calibration windows in the tied pipeline")
    return parser.parse_args()


def share_stage(args) -> dict:
    return {"every": 2, "parts": ["mlp"], "init": args.init if args.init == "mean" else int(args.init)}


def mlps_are_shared(model) -> bool:
    layers = model.model.layers
    return all(layers[i].mlp.down_proj is layers[i + 1].mlp.down_proj for i in range(0, len(layers) - 1, 2))


def heal(args, phases: Phases, checkpoint: Path, blocks, ppl, probe) -> None:
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.distillation import DistillationTrainer, DistillationTrainingArguments
    from hfcompress.report import summarize_folder

    teacher = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    folder = args.work / "shared"
    if not phases.done("shared"):
        student = hfcompress.compress(copy.deepcopy(teacher), {"stages": [{"share": share_stage(args)}]})
        shutil.rmtree(folder, ignore_errors=True)
        save_atomically(student, folder)
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        original, stored = tensor_bytes(checkpoint), tensor_bytes(folder)
        removed = sum(original[key] for key in set(original) - set(stored))
        saved = weights_bytes(checkpoint) - weights_bytes(folder)
        summary = summarize_folder(folder)
        phases.record("shared", wikitext2_ppl=ppl(student), unique_params=summary["unique_params"],
                      total_params=summary["total_params"], original_params=sum(p.numel() for p in teacher.parameters()),
                      file_bytes=weights_bytes(folder), original_file_bytes=weights_bytes(checkpoint),
                      bytes_saved=saved, removed_duplicate_bytes=removed, header_difference_bytes=saved - removed,
                      reload_identical_logits=torch.equal(probe(reloaded), probe(student)),
                      reload_mlps_one_object=mlps_are_shared(reloaded))
    if phases.done("healed"):
        return
    steps = len(blocks) // args.batch_size

    def distiller(student, output):
        distill_args = training_arguments(args, output, steps, DistillationTrainingArguments)
        distill_args.temperature = args.temperature
        return DistillationTrainer(student, distill_args, teacher_model=teacher, train_dataset=blocks)

    healed, seconds, loss = phases.trained("healed", lambda: AutoModelForCausalLM.from_pretrained(folder), distiller)
    phases.record("healed", wikitext2_ppl=ppl(healed), train_seconds=seconds, final_train_loss=loss,
                  unique_params=sum(p.numel() for p in healed.parameters()),
                  reload_mlps_one_object=mlps_are_shared(healed))


def tied_pipeline(args, phases: Phases, checkpoint: Path, tokenizer, probe) -> None:
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.quantization import dispatch

    folder = args.work / "tied-pruned-distilled-w4g64"
    recipe = {
        "calibration": {"samples": args.tied_samples, "seq_len": 2048, "seed": 0},
        "stages": [{"prune": {"heads": 0.3334, "ffn": 0.25}},
                   {"distill": {"steps": args.tied_distill_steps, "seq_len": 256, "batch_size": 4, "temperature": 1.0}},
                   {"quantize": {"method": "gptq", "bits": 4, "group_size": 64, "act_order": True,
                                 "static_groups": True}}]}
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    hfcompress.compress(model, recipe, tokenizer=tokenizer, calibration_data=str(args.data / "austen"))
    shutil.rmtree(folder, ignore_errors=True)
    save_atomically(model, folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    with dispatch.use("reference"):
        identical = torch.equal(probe(reloaded), probe(model))
    readers = args.work / "tied-readers.json"
    subprocess.run([python(), str(REPO / "benchmarks" / "export_readers.py"), str(folder), "--json", str(readers)],
                   check=True)
    phases.record("tied_pipeline", recipe=recipe, reload_identical_logits=identical,
                  tied_in_memory=model.lm_head.weight is model.model.embed_tokens.weight,
                  tied_after_reload=reloaded.lm_head.weight is reloaded.model.embed_tokens.weight,
                  readers=json.loads(readers.read_text())["readers"])


def main():
    args = parse_args()
    checkpoint, tokenizer, ppl, wiki, blocks = prepare(args)

    @torch.no_grad()
    def probe(model):
        return model.eval()(wiki[:512].reshape(1, -1)).logits

    protocol = {
        "model": "SmolLM2-135M-Instruct (bundled GGUF, float32)",
        "sharing": f"share {share_stage(args)}",
        "healing": f"distillation from the unshared model, forward KL at temperature {args.temperature}, "
                   f"{training_protocol(args, len(blocks) // args.batch_size)}",
        "evaluation": f"WikiText-2 raw test, 2048-token windows, {args.eval_windows or 'all'} windows",
        "torch_threads": torch.get_num_threads()}
    phases = Phases(args.work, protocol)
    if not args.skip_tied and not phases.done("tied_pipeline"):
        tied_pipeline(args, phases, checkpoint, tokenizer, probe)
    if not args.skip_heal:
        heal(args, phases, checkpoint, blocks, ppl, probe)
    print(json.dumps(phases.results, indent=2))
    if args.json:
        write_json(args.json, phases.results)


if __name__ == "__main__":
    main()
