"""The ``distill`` stage: heal the model with :class:`DistillationTrainer`, inside a recipe.

``teacher: original`` is the model as it entered the recipe: :func:`hfcompress.compress` keeps a
copy before the first stage when a distill stage asks for it (so ``prune -> distill ->
quantize`` distills the pruned model from the unpruned one). Training runs in a temporary folder
(no checkpoints are kept); the stage logs the loss terms as it goes.

After ``quantize`` the stage is quantization-aware distillation: the packed codes stay frozen and
the group scales (and zero points) train (``quantization/trainable.py``), then go back into the
packed format, so the model saves with the same bits per weight as before; with ``train: [codes]``
each code may also move one grid step (its rounding learned end to end). Or LoRA adapters train
on the packed layers (``train: [lora]``); at the end they merge into the dequantized weights, which
the recipe's quantize stage then quantizes again (GPTQ sees the merged weights).
"""

from __future__ import annotations

import logging
import os
import tempfile

from torch import nn

from ..config import CompressionConfig
from ..context import CompressionContext
from ..errors import UserError
from ..quantization.dequantize import dequantize_model
from ..quantization.stage import apply_quantize_stage
from ..quantization.trainable import freeze_scales, make_scales_trainable
from ..recipe import DistillStage
from .data import packed_dataset
from .trainer import DistillationTrainer, DistillationTrainingArguments, load_teacher

logger = logging.getLogger(__name__)


def apply_distill_stage(model: nn.Module, stage: DistillStage, config: CompressionConfig, context: CompressionContext) -> None:
    """Train ``model`` in place toward the stage's teacher."""
    parts = _parts(stage, config)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError("distill: this stage trains the model in place for the stages after it, which need its whole "
                        "tensors, not FSDP shards; run compress without FSDP, or shard with DistillationTrainer and "
                        "fsdp_config in a training script")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UserError(f"distill: {type(model).__name__} has no LM head to distill logits into; load it with "
                        "AutoModelForCausalLM")
    if stage.teacher == "original":
        teacher = context.original_model
        if teacher is None:
            raise RuntimeError("teacher: original needs the model as it entered the recipe, and none was kept")
    else:
        teacher = load_teacher(stage.teacher)
    data = stage.data if stage.data is not None else context.text_source()
    tokenizer = context.tokenizer_for(data)
    dataset = packed_dataset(tokenizer, data, stage.seq_len,
                             max_tokens=stage.steps * stage.batch_size * stage.gradient_accumulation * stage.seq_len)
    logger.info("distill: %d steps of %d x %d tokens (%d blocks of data) from teacher %s", stage.steps,
                stage.batch_size * stage.gradient_accumulation, stage.seq_len, len(dataset), stage.teacher)
    cuda = next(model.parameters()).is_cuda
    with tempfile.TemporaryDirectory(prefix="hfcompress-distill-") as scratch:
        args = DistillationTrainingArguments(
            output_dir=scratch, max_steps=stage.steps, per_device_train_batch_size=stage.batch_size,
            gradient_accumulation_steps=stage.gradient_accumulation, learning_rate=stage.lr,
            lr_scheduler_type="cosine", warmup_steps=round(stage.warmup * stage.steps),
            logging_steps=max(1, stage.steps // 20), save_strategy="no", report_to=[], seed=context.calibration.seed,
            bf16=stage.dtype == "bfloat16", fp16=stage.dtype == "float16", use_cpu=not cuda,
            dataloader_num_workers=0, temperature=stage.temperature, divergence=stage.divergence, beta=stage.beta,
            kl_weight=stage.loss.kl, ce_weight=stage.loss.ce, hidden_weight=stage.loss.hidden,
            attention_weight=stage.loss.attention, layer_map=stage.layer_map,
        )
        was_training = model.training
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        student = _with_adapters(model, stage.lora_rank) if "lora" in parts else model
        try:
            trainable = make_trainable(student, parts)
            logger.info("distill: training %s (%s values)", ", ".join(parts), f"{trainable:,}")
            trainer = DistillationTrainer(student, args, teacher_model=teacher, train_dataset=dataset)
            trainer.train()
        finally:
            model.train(was_training)
            frozen = freeze_scales(model)  # trained scales (and codes) back into the packed format
            if frozen:
                logger.info("distill: stored the trained %s of %d packed layers",
                            " and ".join(p for p in ("scales", "codes") if p in parts), frozen)
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
    if student is not model:
        _merge_adapters(student, model, config, context)
    for p in model.parameters():
        p.grad = None


def _with_adapters(model: nn.Module, rank: int) -> nn.Module:
    """``model`` with LoRA adapters on every linear layer, packed ones included (peft)."""
    try:
        import peft
    except ImportError:
        raise UserError("distill: train: lora needs peft (pip install 'hfcompress[peft]')") from None
    return peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))


def _merge_adapters(student: nn.Module, model: nn.Module, config: CompressionConfig,
                    context: CompressionContext) -> None:
    """Merge the trained adapters into ``model``; a quantized model is dequantized first, then
    quantized again by the recipe's quantize stage, on the merged weights."""
    quantized = bool(config.modules)
    if quantized:
        dequantize_model(model, config)
    student.merge_and_unload()  # peft replaces the adapter layers of ``model`` in place
    if quantized:
        stage = next(s for s in config.recipe.stages if s.name == "quantize")
        logger.info("distill: adapters merged; quantizing the merged weights again (%s, %d bits)", stage.method,
                    stage.bits)
        apply_quantize_stage(model, stage, config, context)


def _parts(stage: DistillStage, config: CompressionConfig) -> list[str]:
    """What trains: the stage's ``train``, else every weight, or the scales once quantized."""
    parts = stage.train if stage.train is not None else ["scales"] if config.modules else ["weights"]
    if config.modules and "weights" in parts:
        raise UserError("distill: the model is quantized and its packed weights do not train; use train: [scales] "
                        "(and norms), or put distill before quantize")
    for part in ("scales", "codes"):
        if not config.modules and part in parts:
            raise UserError(f"distill: train: {part} needs a quantized model (packed layers have {part}); put the "
                            "distill stage after quantize, or train: [weights]")
    return parts


def make_trainable(model: nn.Module, parts: list[str]) -> int:
    """Set what trains (``weights``, ``scales``, ``codes``, ``norms``, ``lora``); return the number
    of trainable values."""
    if "weights" not in parts:
        model.requires_grad_(False)
        if "scales" in parts or "codes" in parts:
            make_scales_trainable(model, scales="scales" in parts, codes="codes" in parts)
        if "norms" in parts:
            for module in model.modules():
                if "norm" in type(module).__name__.lower():  # LayerNorm, LlamaRMSNorm, ...
                    module.requires_grad_(True)
        if "lora" in parts:
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
