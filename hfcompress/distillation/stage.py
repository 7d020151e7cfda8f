"""The ``distill`` stage: heal the model with :class:`DistillationTrainer`, inside a recipe.

``teacher: original`` is the model as it entered the recipe: :func:`hfcompress.compress` keeps a
copy before the first stage when a distill stage asks for it (so ``prune -> distill ->
quantize`` distills the pruned model from the unpruned one). Training runs in a temporary folder
(no checkpoints are kept); the stage logs the loss terms as it goes.
"""

from __future__ import annotations

import logging
import tempfile

from torch import nn

from ..config import CompressionConfig
from ..context import CompressionContext
from ..errors import UserError
from ..recipe import DistillStage
from .data import packed_dataset
from .trainer import DistillationTrainer, DistillationTrainingArguments, load_teacher

logger = logging.getLogger(__name__)


def apply_distill_stage(model: nn.Module, stage: DistillStage, config: CompressionConfig, context: CompressionContext) -> None:
    """Train ``model`` in place toward the stage's teacher."""
    if config.modules:
        raise UserError("distill: the model is already quantized (packed layers do not train); put distill "
                        "before quantize")
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
        try:
            trainer = DistillationTrainer(model, args, teacher_model=teacher, train_dataset=dataset)
            trainer.train()
        finally:
            model.train(was_training)
    for p in model.parameters():
        p.grad = None
