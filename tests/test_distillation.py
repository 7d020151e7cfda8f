"""DistillationTrainer on tiny models: the loss falls, the teacher stays frozen, resume is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import scrambled, tiny_llama

import hfcompress
from hfcompress.distillation import DistillationTrainer, DistillationTrainingArguments, PackedBlocks

IDS = torch.randint(0, 300, (64 * 32,), generator=torch.Generator().manual_seed(0))


def peaked_teacher():
    teacher = tiny_llama()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(5)  # peaked next-token distributions: a random model's are near uniform
    return teacher


def divergences_from(teacher, data, *models) -> list[float]:
    """Each model's forward KL (temperature 2) from ``teacher`` on ``data``."""
    from hfcompress.distillation import logit_divergence

    with torch.no_grad():
        target = teacher(data).logits
        return [float(logit_divergence(model(data).logits, target, 2.0)) for model in models]


def teacher_and_student(hidden: float = 0):
    teacher = peaked_teacher()
    student = copy.deepcopy(teacher)
    stage = {"heads": 3, "ffn": 0.5, "importance": "magnitude"}
    if hidden:
        stage["hidden"] = hidden
    hfcompress.compress(student, {"stages": [{"prune": stage}]})
    return teacher, student


def arguments(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3,
                   lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], seed=0,
                   use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    return DistillationTrainingArguments(**{**options, **overrides})


def batch_loss(trainer, blocks):
    batch = {k: torch.stack([blocks[i][k] for i in range(8)]) for k in blocks[0]}
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def test_a_few_steps_reduce_the_loss_and_the_teacher_stays_frozen(tmp_path):
    teacher, student = teacher_and_student()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    blocks = PackedBlocks(IDS[: 8 * 32], 32)  # one batch, seen every step: the student can match the teacher on it
    args = arguments(tmp_path, max_steps=30, per_device_train_batch_size=8, ce_weight=0.01)
    trainer = DistillationTrainer(student, args, teacher_model=teacher, train_dataset=blocks)
    before = batch_loss(trainer, blocks)
    trainer.train()
    assert batch_loss(trainer, blocks) < 0.5 * before
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    logged = [entry for entry in trainer.state.log_history if "loss_kl" in entry]
    assert logged and "loss_ce" in logged[0]


def test_resume_reports_a_tensor_missing_only_when_none_of_its_names_was_loaded(tmp_path, monkeypatch):
    import transformers.trainer
    from torch.nn.modules.module import _IncompatibleKeys

    teacher, student = teacher_and_student()
    assert student.lm_head.weight is student.model.embed_tokens.weight
    trainer = DistillationTrainer(student, arguments(tmp_path), teacher_model=teacher,
                                  train_dataset=PackedBlocks(IDS, 32))
    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(message))
    trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight"], []))  # loaded as the embedding
    assert warnings == []
    trainer._issue_warnings_after_load(_IncompatibleKeys(["lm_head.weight", "model.embed_tokens.weight",
                                                          "model.norm.weight"], []))
    assert len(warnings) == 1
    assert all(key in warnings[0] for key in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"))


def test_resume_from_a_checkpoint_gives_the_same_weights(tmp_path):
    blocks = PackedBlocks(IDS, 32)
    teacher, student = teacher_and_student()
    straight = DistillationTrainer(copy.deepcopy(student), arguments(tmp_path / "a"), teacher_model=teacher,
                                   train_dataset=blocks)
    straight.train()
    first = DistillationTrainer(copy.deepcopy(student), arguments(tmp_path / "b", max_steps=6, save_strategy="steps",
                                                                  save_steps=3), teacher_model=teacher,
                                train_dataset=blocks)
    first.train()
    resumed_model = scrambled(copy.deepcopy(student))  # equal at the end only if the checkpoint loaded
    resumed = DistillationTrainer(resumed_model, arguments(tmp_path / "b"), teacher_model=teacher, train_dataset=blocks)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-3"))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_hidden_states_of_a_narrower_student_go_through_learned_projections(tmp_path):
    teacher, student = teacher_and_student(hidden=0.25)
    blocks = PackedBlocks(IDS, 32)
    args = arguments(tmp_path, hidden_weight=1.0, save_strategy="steps", save_steps=3)
    trainer = DistillationTrainer(student, args, teacher_model=teacher, train_dataset=blocks)
    assert set(trainer.projections) == {"1", "2"}
    start = {k: v.clone() for k, v in trainer.projections.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, trainer.projections.state_dict()[k]) for k, v in start.items())
    assert (tmp_path / "run" / "checkpoint-3" / "distillation_projections.safetensors").exists()


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_other_divergences_train(tmp_path, divergence):
    teacher, student = teacher_and_student()
    blocks = PackedBlocks(IDS[: 8 * 32], 32)
    forward = DistillationTrainer(copy.deepcopy(student), arguments(tmp_path / "kl", ce_weight=0.0),
                                  teacher_model=teacher, train_dataset=blocks)
    trainer = DistillationTrainer(student, arguments(tmp_path, max_steps=20, per_device_train_batch_size=8,
                                                     ce_weight=0.0, divergence=divergence),
                                  teacher_model=teacher, train_dataset=blocks)
    before = batch_loss(trainer, blocks)
    assert before != pytest.approx(batch_loss(forward, blocks), rel=1e-3)  # this divergence, not forward KL
    trainer.train()
    assert batch_loss(trainer, blocks) < 0.7 * before


def test_mismatched_teachers_and_arguments_are_clear_errors(tmp_path, tokenizer):
    from transformers import PreTrainedTokenizerFast

    teacher, student = teacher_and_student()
    other = tiny_llama(vocab_size=400)
    with pytest.raises(ValueError, match="vocabulary"):
        DistillationTrainer(student, arguments(tmp_path), teacher_model=other, train_dataset=PackedBlocks(IDS, 32))
    different = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tokenizer.backend_tokenizer), eos_token="<eos>")
    different.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        DistillationTrainer(student, arguments(tmp_path), teacher_model=teacher, processing_class=tokenizer,
                            teacher_tokenizer=different, train_dataset=PackedBlocks(IDS, 32))
    with pytest.raises(ValueError, match="divergence"):
        arguments(tmp_path, divergence="kl")
    with pytest.raises(ValueError, match="at least one positive"):
        arguments(tmp_path, kl_weight=0.0)


def test_prune_distill_quantize_in_one_recipe(tmp_path):
    """The recipe stage: the pruned student moves toward the original, then quantizes and reloads."""
    teacher = peaked_teacher()
    model = copy.deepcopy(teacher)
    data = IDS[: 8 * 32].view(8, 32)
    prune = {"prune": {"heads": 3, "ffn": 0.5, "importance": "magnitude"}}
    pruned = hfcompress.compress(copy.deepcopy(model), {"stages": [prune]})
    recipe = {"stages": [prune,
                         {"distill": {"teacher": "original", "steps": 30, "seq_len": 32, "batch_size": 8, "lr": 3e-3,
                                      "warmup": 0.0, "loss": {"kl": 1.0}}},
                         {"quantize": {"method": "rtn", "bits": 8, "group_size": 32}}]}
    hfcompress.compress(model, recipe, calibration_data=data)
    before, after = divergences_from(teacher, data, pruned, model)
    assert after < 0.5 * before
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(type(model).from_pretrained(tmp_path)(data).logits, model(data).logits)


@pytest.mark.parametrize("sym", [True, False])
def test_quantize_then_distill_heals_the_scales_and_stays_packed(tmp_path, sym):
    """Quantization-aware distillation: 3-bit codes stay, the scales (and zero points) learn from
    the float model; the result saves packed, at the same size, and reloads bit-identically."""
    teacher = peaked_teacher()
    data = IDS[: 8 * 32].view(8, 32)
    quantize = {"quantize": {"method": "rtn", "bits": 3, "group_size": 32, "sym": sym}}
    quantized = hfcompress.compress(copy.deepcopy(teacher), {"stages": [quantize]})
    model = copy.deepcopy(teacher)
    recipe = {"stages": [quantize, {"distill": {"teacher": "original", "steps": 30, "seq_len": 32, "batch_size": 8,
                                                "lr": 2e-3, "warmup": 0.1}}]}
    hfcompress.compress(model, recipe, calibration_data=data)
    before, after = divergences_from(teacher, data, quantized, model)
    assert after < 0.7 * before
    packed = {k: v for k, v in model.state_dict().items() if k.endswith(("qweight", "qzeros"))}
    reference = quantized.state_dict()
    assert packed and all(torch.equal(v, reference[k]) for k, v in packed.items() if k.endswith("qweight"))
    scales = [(model.state_dict()[k], reference[k]) for k in reference if k.endswith("scales")]
    changed = sum(int((a != b).sum()) for a, b in scales) / sum(b.numel() for _, b in scales)
    assert changed > 0.5  # the scales learned (a tiny change rounds back to the same float16)
    assert not any(p.requires_grad is False for p in model.parameters())  # trainability as it was
    assert not [k for k in model.state_dict() if "log_scales" in k or "float_zeros" in k]
    model.save_pretrained(tmp_path / "a")
    quantized.save_pretrained(tmp_path / "b")
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "a") == size(tmp_path / "b")  # the same bits per weight
    reloaded = type(model).from_pretrained(tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(reloaded(data).logits, model(data).logits)


def rtn_then_distill(train: list[str]):
    """A 3-bit RTN model, and the same recipe followed by 8 distill steps training ``train``; and the data."""
    teacher = peaked_teacher()
    data = IDS[: 8 * 32].view(8, 32)
    quantize = {"quantize": {"method": "rtn", "bits": 3, "group_size": 32}}
    quantized = hfcompress.compress(copy.deepcopy(teacher), {"stages": [quantize]})
    model = copy.deepcopy(teacher)
    recipe = {"stages": [quantize, {"distill": {"teacher": "original", "steps": 8, "seq_len": 32, "batch_size": 8,
                                                "lr": 1e-2, "warmup": 0.0, "train": train}}]}
    hfcompress.compress(model, recipe, calibration_data=data)
    return quantized, model, data


def test_distill_trains_the_norms_with_the_scales_and_nothing_else(tmp_path):
    """``train: [scales, norms]``: the norms' weights and the group scales move, the packed codes,
    the embeddings and the LM head stay; the trained norms save as plain float weights."""
    quantized, model, _ = rtn_then_distill(["scales", "norms"])
    before, after = quantized.state_dict(), model.state_dict()
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    norms = {k for k in before if "norm" in k}
    scales = {k for k in before if k.endswith(".scales")}
    assert norms and norms <= moved
    assert scales & moved
    assert moved <= norms | scales  # codes, embeddings and head as they were
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(reloaded[k], after[k]) for k in norms)


def test_distill_trains_the_rounding_of_the_codes_a_step_at_most(tmp_path):
    """``train: [scales, codes]``: packed codes move a grid step at most (no more than the clamp lets
    them), the trained codes save in the same format, and the reload computes the same logits."""
    quantized, model, data = rtn_then_distill(["scales", "codes"])
    pairs = [(a, b) for a, b in zip(model.modules(), quantized.modules()) if hasattr(a, "qweight")]
    steps = torch.cat([(a.unpack().q.long() - b.unpack().q.long()).flatten() for a, b in pairs])
    assert steps.abs().max() == 1 and steps.ne(0).any()
    assert not [name for name, _ in model.named_parameters() if "code_offsets" in name or "log_scales" in name]
    model.save_pretrained(tmp_path / "trained")
    quantized.save_pretrained(tmp_path / "untrained")
    size = lambda folder: (tmp_path / folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size("trained") == size("untrained")  # the same bits per weight
    reloaded = type(model).from_pretrained(tmp_path / "trained")
    with torch.no_grad():
        assert torch.equal(reloaded(data).logits, model(data).logits)


@pytest.mark.parametrize("codes", [False, True])
def test_a_run_training_scales_checkpoints_them_and_resumes_exactly(tmp_path, codes):
    from hfcompress.quantization.trainable import freeze_scales, make_scales_trainable

    blocks = PackedBlocks(IDS, 32)
    teacher = peaked_teacher()
    quantized = hfcompress.compress(copy.deepcopy(teacher), {"stages": [{"quantize": {"bits": 3, "group_size": 32}}]})

    def student():
        model = copy.deepcopy(quantized).requires_grad_(False)
        make_scales_trainable(model, codes=codes)
        return model

    lr = {"learning_rate": 3e-2} if codes else {}  # codes move once their offsets gather half a step
    straight = DistillationTrainer(student(), arguments(tmp_path / "a", **lr), teacher_model=teacher, train_dataset=blocks)
    straight.train()
    first = DistillationTrainer(student(), arguments(tmp_path / "b", save_strategy="steps", save_steps=3, **lr),
                                teacher_model=teacher, train_dataset=blocks)
    first.train()
    checkpoint = tmp_path / "b" / "run" / "checkpoint-3"
    assert (checkpoint / "trained_parameters.safetensors").exists()
    resumed_model = student()
    with torch.no_grad():  # the trained scales off: equal at the end only if the checkpoint loaded
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    resumed = DistillationTrainer(resumed_model, arguments(tmp_path / "b", **lr), teacher_model=teacher,
                                  train_dataset=blocks)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for model in (straight.model, resumed.model):
        freeze_scales(model)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(straight.model.state_dict()["model.layers.0.mlp.up_proj.scales"],
                           quantized.state_dict()["model.layers.0.mlp.up_proj.scales"])
    codes_moved = [not torch.equal(straight.model.state_dict()[k], v) for k, v in quantized.state_dict().items()
                   if k.endswith("qweight")]
    assert any(codes_moved) == codes


def test_lora_adapters_on_a_quantized_model_merge_and_quantize_again():
    pytest.importorskip("peft")
    teacher = peaked_teacher()
    data = IDS[: 8 * 32].view(8, 32)
    # Pruned, then quantized at 8 bits: the pruning is what the adapters heal, and 8-bit rounding of
    # the merged weights keeps what they learned.
    prune = {"prune": {"heads": 3, "ffn": 0.5, "importance": "magnitude"}}
    quantize = {"quantize": {"method": "rtn", "bits": 8, "group_size": 32}}
    quantized = hfcompress.compress(copy.deepcopy(teacher), {"stages": [prune, quantize]})
    model = copy.deepcopy(teacher)
    recipe = {"stages": [prune, quantize, {"distill": {"steps": 20, "seq_len": 32, "batch_size": 8, "lr": 1e-2,
                                                       "warmup": 0.1, "train": ["lora"], "lora_rank": 4}}]}
    hfcompress.compress(model, recipe, calibration_data=data)
    before, after = divergences_from(teacher, data, quantized, model)
    assert after < 0.7 * before
    assert type(model.model.layers[0].mlp.up_proj) is hfcompress.QuantLinear  # packed again, no adapter left
    assert not [name for name, _ in model.named_parameters() if "lora_" in name]
    assert set(model.config.quantization_config.modules) == set(quantized.config.quantization_config.modules)


def test_distill_after_quantize_refuses_to_train_packed_weights():
    recipe = {"stages": [{"quantize": {"bits": 8, "group_size": 32}},
                         {"distill": {"steps": 1, "seq_len": 16, "train": ["weights"]}}]}
    with pytest.raises(hfcompress.errors.UserError, match="distill after quantize cannot train weights"):
        hfcompress.compress(tiny_llama(), recipe, calibration_data=IDS[:64].view(2, 32))  # by the recipe: nothing ran
    for part in ("scales", "codes"):
        recipe = {"stages": [{"distill": {"steps": 1, "seq_len": 16, "train": [part]}}]}
        with pytest.raises(hfcompress.errors.UserError, match=f"train: {part} needs a quantized model"):
            hfcompress.compress(tiny_llama(), recipe, calibration_data=IDS[:64].view(2, 32))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_accelerate_processes_match_one_with_twice_the_accumulation(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo) against one process with 2x accumulation:
    the same 4 blocks per step, so the same losses and weights up to float summation order."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "distill_run.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one" / "result.json"
    two = tmp_path / "two" / "result.json"
    one.parent.mkdir()
    two.parent.mkdir()
    subprocess.run([sys.executable, str(script), "--output", str(one), "--accumulation", "2"], check=True, env=env,
                   capture_output=True)
    # accelerate 1.x starts several CPU processes through its torchrun launcher (named --multi_gpu; without
    # GPUs the processes join a gloo group) or through mpirun; its --cpu flag alone runs one process.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    result = subprocess.run([*launch, str(script), "--output", str(two)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["processes"] == 2 and a["processes"] == 1
    assert len(a["losses"]) == len(b["losses"]) == 4
    for x, y in zip(a["losses"], b["losses"]):
        assert abs(x - y) <= 1e-4 * abs(x) + 2e-4  # Trainer logs losses rounded to 4 decimals
    assert abs(a["weights_abs_sum"] - b["weights_abs_sum"]) <= 1e-5 * a["weights_abs_sum"]


def test_bitsandbytes_8bit_optimizer_trains_the_student(tmp_path):
    teacher, student = teacher_and_student()
    start = student.model.layers[0].mlp.down_proj.weight.detach().clone()
    args = arguments(tmp_path, max_steps=2, optim="adamw_bnb_8bit")
    trainer = DistillationTrainer(student, args, teacher_model=teacher, train_dataset=PackedBlocks(IDS, 32))
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__module__.startswith("bitsandbytes")
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, start)


def test_distill_stage_while_loading(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    recipe = {"calibration": {"samples": 4, "seq_len": 32},
              "stages": [{"prune": {"heads": 3, "importance": "magnitude"}},
                         {"distill": {"steps": 2, "seq_len": 32, "batch_size": 2}}]}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=recipe)
    assert model.config.num_attention_heads == 3
    assert getattr(model.config, "quantization_config", None) is None  # a plain checkpoint again
    pruned = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression={"stages": [recipe["stages"][0]]})
    assert pruned.config.num_attention_heads == 3
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, pruned.model.layers[0].mlp.down_proj.weight)


def test_a_stage_that_leaves_non_finite_weights_is_refused_and_nothing_is_saved(tmp_path, monkeypatch):
    from hfcompress import pipeline
    from hfcompress.errors import StageError

    def diverging(model, stage, config, context):  # as a training step with a loss gone NaN would leave it
        model.model.layers[1].mlp.up_proj.weight.data[0, 0] = float("nan")

    monkeypatch.setitem(pipeline.STAGE_RUNNERS, "distill", diverging)
    model = tiny_llama()
    model.model.layers[0].self_attn.register_buffer("mask", torch.full((2,), float("-inf")))  # the model's own
    recipe = {"stages": [{"distill": {"steps": 2, "seq_len": 16}}]}
    with pytest.raises(StageError, match=r"stage 1 \(distill\) left non-finite values .* in "
                                         r"model.layers.1.mlp.up_proj.weight; nothing was saved"):
        hfcompress.compress(model, recipe, calibration_data=IDS[:64].view(2, 32))
    assert hfcompress.compression_record(model) is None  # no record: save_pretrained writes no compressed model


def test_plain_training_arguments_and_a_tokenizer_without_pad_token(tmp_path, tokenizer):
    from transformers import TrainingArguments

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None  # packed blocks have nothing to pad
    teacher, student = teacher_and_student()
    start = student.model.layers[0].mlp.down_proj.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = DistillationTrainer(student, args, teacher_model=teacher, train_dataset=PackedBlocks(IDS, 32),
                                  processing_class=tokenizer)
    assert (trainer.args.divergence, trainer.args.temperature, trainer.args.beta) == ("forward", 2.0, 0.5)
    trainer.train()
    assert not torch.equal(student.model.layers[0].mlp.down_proj.weight, start)
    with pytest.raises(ValueError, match=r"beta: 1.5 must lie in \[0, 1\]"):
        arguments(tmp_path, divergence="jsd", beta=1.5)
