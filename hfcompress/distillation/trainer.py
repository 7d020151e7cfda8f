"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is the teacher's guidance.

Only the loss changes: :meth:`DistillationTrainer.compute_loss` runs the frozen teacher on the
same batch and mixes

    kl_weight * T^2 KL(teacher || student at temperature T)     (or reverse KL, or JSD)
  + ce_weight * cross-entropy on the labels
  + hidden_weight * MSE(projection(student hidden), teacher hidden), over ``layer_map``
  + attention_weight * KL(teacher attention || student attention), over ``layer_map``

so everything else Trainer does keeps working: gradient accumulation, bf16, gradient
checkpointing, evaluation, checkpoints and resume, callbacks, logging, ``accelerate launch``,
and bitsandbytes' 8-bit optimizers. Every term is a mean over the batch's tokens; with packed
fixed-length blocks the Trainer's division by the accumulation steps then gives exactly the mean
over the accumulated batch, on one process or several.

The teacher stays frozen (no gradients, eval mode), in its own dtype and on its own device. When
widths differ (hidden channels pruned) the hidden-state term learns one linear projection per
mapped student layer; those projections train with the student (an extra optimizer group) and
are saved in each checkpoint (``distillation_projections.safetensors``) so that resuming is exact.

A quantized student whose scales train (``quantization/trainable.py``) checkpoints what trains,
as an adapter checkpoint holds its adapters (``trained_parameters.safetensors``): the packed
buffers never change in training (trained code offsets stay within one grid step: each optimizer
step ends by projecting them back), and the model saves only once what trained is frozen back
into the format.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from ..quantization.trainable import layers_in_training, project_codes
from ..recipe import check_divergence, check_loss_weights
from .data import PackedBlocks
from .losses import attention_kl, hidden_mse, logit_divergence

logger = logging.getLogger(__name__)

PROJECTIONS_FILE = "distillation_projections.safetensors"
TRAINED_FILE = "trained_parameters.safetensors"  # checkpoints of a student whose scales train


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the distillation loss (``HfArgumentParser`` reads these too)."""

    temperature: float = field(default=2.0, metadata={"help": "softmax temperature of the logit divergence"})
    kl_weight: float = field(default=1.0, metadata={"help": "weight of the logit divergence"})
    ce_weight: float = field(default=0.0, metadata={"help": "weight of the cross-entropy on the labels"})
    hidden_weight: float = field(default=0.0, metadata={"help": "weight of the hidden-state MSE"})
    attention_weight: float = field(default=0.0, metadata={"help": "weight of the attention-map KL (eager attention)"})
    divergence: str = field(default="forward", metadata={"help": "forward | reverse | jsd"})
    beta: float = field(default=0.5, metadata={"help": "jsd: the generalized JSD's interpolation, as TRL GKD's beta "
                                                       "(0: forward KL, 1: reverse KL)"})
    layer_map: list[list[int]] | None = field(
        default=None,
        metadata={"help": "pairs [student, teacher] of hidden-state indices (0: embeddings, i: block i - 1's "
                          "output); default: the last state of each, plus evenly spaced ones"},
    )

    def __post_init__(self):
        super().__post_init__()
        # The same checks as the recipe's distill stage (RecipeError is a ValueError).
        check_divergence(self.divergence, self.temperature, self.beta)
        check_loss_weights(self.kl_weight, self.ce_weight, self.hidden_weight, self.attention_weight)


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student hidden-state index -> teacher index: ``i -> round(i * L_t / L_s)`` for ``i = 1..L_s``.

    >>> default_layer_map(2, 4)
    {1: 2, 2: 4}
    """
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


def load_teacher(teacher: PreTrainedModel | str | os.PathLike, **kwargs) -> PreTrainedModel:
    """A model object, or a local path / Hub id loaded with ``AutoModelForCausalLM``."""
    if isinstance(teacher, nn.Module):
        return teacher
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher, dtype=kwargs.pop("dtype", "auto"), **kwargs)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Distillation compares token distributions: both models must read and write the same tokens."""
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ValueError(
            "the student's and the teacher's tokenizers differ (vocabularies of "
            f"{len(student_tokenizer)} and {len(teacher_tokenizer)} tokens); distill from a teacher of the same "
            "family and tokenizer"
        )


class _SaveProjections(TrainerCallback):
    def __init__(self, trainer: DistillationTrainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if self.trainer.projections is not None and state.is_world_process_zero:
            from safetensors.torch import save_file

            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainer.projections.state_dict().items()}
            save_file(tensors, str(folder / PROJECTIONS_FILE))


class _ProjectCodes(TrainerCallback):
    """Trained code offsets back within one grid step after every optimizer step (projected descent)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            project_codes(model)


class DistillationTrainer(Trainer):
    """``Trainer`` with a distillation loss from ``teacher_model`` (a model, a path or a Hub id).

    ``args`` should be :class:`DistillationTrainingArguments`; plain ``TrainingArguments`` mean
    the defaults (forward KL at temperature 2). ``teacher_tokenizer``, when given, is checked
    against ``processing_class``.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns per-batch means; Trainer divides by the steps

    def __init__(self, model=None, args: TrainingArguments | None = None, *, teacher_model, teacher_tokenizer=None,
                 **kwargs):
        self._projections_join = False  # set by create_optimizer when the optimizer is ours to extend
        if kwargs.get("data_collator") is None and isinstance(kwargs.get("train_dataset"), PackedBlocks):
            # Packed blocks all have one length: stack them. Trainer's default for a tokenizer pads,
            # which fails for tokenizers without a pad token although there is nothing to pad.
            kwargs["data_collator"] = default_data_collator
        super().__init__(model=model, args=args, **kwargs)
        if not isinstance(self.args, DistillationTrainingArguments):
            # The fields' defaults, read off the class: building a second TrainingArguments here
            # would reset the accelerator state the Trainer has just set up.
            for f in fields(DistillationTrainingArguments):
                if f.name not in {g.name for g in fields(TrainingArguments)}:
                    setattr(self.args, f.name, f.default)
        teacher = load_teacher(teacher_model)
        teacher.eval()
        teacher.requires_grad_(False)
        self.teacher = teacher
        student_vocab = self.model.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
        if student_vocab != teacher_vocab:
            raise ValueError(f"the student's vocabulary ({student_vocab}) and the teacher's ({teacher_vocab}) differ; "
                             "distill from a teacher with the same tokenizer")
        check_same_tokenizer(self.processing_class, teacher_tokenizer)
        self.teacher = self._shard_like_student(teacher)
        self._term_sums: dict[str, float] = {}
        self._term_count = 0
        self.layer_map = self._layer_map()
        self.projections = self._projections()
        if self.projections is not None:
            self.add_callback(_SaveProjections(self))
        self.add_callback(_ProjectCodes())

    # --- what compute_loss needs ------------------------------------------------------------------
    def _shard_like_student(self, teacher: nn.Module) -> nn.Module:
        """Under FSDP the teacher is sharded as the student is (the plugin's wrap policy, resharding,
        offload and mixed precision): each process keeps 1/N of its weights and gathers one wrapped
        layer at a time during the forward, so a teacher as large as the student fits where it does."""
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
            from accelerate.utils import fsdp2_prepare_model

            # Not accelerator.prepare: that would register the teacher among the models it saves.
            return fsdp2_prepare_model(self.accelerator, teacher)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            logger.warning("every process holds the whole teacher under %s (only the student is sharded); use "
                           "FSDP2 (fsdp_config version 2) to shard the teacher too, or load it in a smaller dtype",
                           "DeepSpeed" if self.is_deepspeed_enabled else "FSDP1")
        return teacher

    def _layer_map(self) -> dict[int, int]:
        if self.args.layer_map:
            return {int(s): int(t) for s, t in self.args.layer_map}
        return default_layer_map(self.model.config.num_hidden_layers, self.teacher.config.num_hidden_layers)

    def _projections(self) -> nn.ModuleDict | None:
        if self.args.hidden_weight == 0:
            return None
        student_width = self.model.config.hidden_size
        teacher_width = self.teacher.config.hidden_size
        if student_width == teacher_width:
            return None
        device = next(self.model.parameters()).device
        torch.manual_seed(self.args.seed)
        return nn.ModuleDict({str(s): nn.Linear(student_width, teacher_width, bias=False, device=device)
                              for s in self.layer_map})

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self._projections_join = True  # an optimizer of our own making (not one the user passed in)
        return super().create_optimizer(model)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # The projections join the optimizer here, after accelerate has prepared it (under FSDP2 it
        # swaps the student's parameters for their shards there, by identity, and would not know
        # the projections) and before the scheduler reads its groups or a checkpoint restores them.
        optimizer = optimizer if optimizer is not None else self.optimizer
        if self.projections is not None and self._projections_join and optimizer is not None:
            params = list(self.projections.parameters())
            joined = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if not any(id(p) in joined for p in params):
                self.projections.to(self.args.device)
                optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return super().create_scheduler(num_training_steps, optimizer)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.projections is not None and self.accelerator.num_processes > 1:
            # The projections train outside the wrapped student, whose gradients DDP/FSDP average;
            # theirs are averaged here the same way, or each process would step them differently.
            # (Averaging each micro-batch's running sum still gives the mean of the sums.)
            for p in self.projections.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(self.accelerator.num_processes)
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not layers_in_training(self.model):
            return super()._save(output_dir, state_dict)
        # Scales in training: a checkpoint holds the parameters that train (the rest never changes).
        if self.args.should_save:
            from safetensors.torch import save_file

            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()
                       if p.requires_grad}, str(folder / TRAINED_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        trained = Path(resume_from_checkpoint) / TRAINED_FILE
        if trained.exists():
            from safetensors.torch import load_file

            saved = load_file(str(trained))
            params = dict(self.model.named_parameters())
            if set(saved) != {name for name, p in params.items() if p.requires_grad}:
                raise ValueError(f"{trained} holds other trainable parameters than this model has (was it saved "
                                 "by a run that trained other parts?)")
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / PROJECTIONS_FILE
        if self.projections is not None and path.exists():
            from safetensors.torch import load_file

            self.projections.load_state_dict(load_file(str(path)))

    def _issue_warnings_after_load(self, load_result) -> None:
        # A checkpoint stores a shared tensor (tied embeddings, a shared layer) once, under one of its
        # names, and loading that name fills every alias. Transformers would list the other names as
        # missing keys, a false alarm on every resume of a shared model: keep only the names whose
        # tensor was loaded under none of its names.
        state = self.model.state_dict(keep_vars=True)
        missing = set(load_result.missing_keys)
        loaded = {id(tensor) for name, tensor in state.items() if name not in missing}
        really_missing = [key for key in load_result.missing_keys if id(state[key]) not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=really_missing))

    def _teacher_outputs(self, inputs: dict, hidden: bool, attentions: bool):
        device = next(self.teacher.parameters()).device
        batch = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        # Under the run's mixed precision too (accelerate wraps only the student's forward): a float32
        # teacher beside a bf16 student would cost more than the student's forward and backward.
        with torch.no_grad(), self.accelerator.autocast():
            return self.teacher(**batch, output_hidden_states=hidden, output_attentions=attentions, use_cache=False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        hidden = args.hidden_weight > 0
        attentions = args.attention_weight > 0
        labels = inputs.get("labels")
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**batch, output_hidden_states=hidden, output_attentions=attentions, use_cache=False)
        # Cross-entropy alone (the baseline a distillation is compared with) needs no teacher.
        teacher = self._teacher_outputs(inputs, hidden, attentions) if args.kl_weight or hidden or attentions else None
        mask = inputs.get("attention_mask")
        device = outputs.logits.device
        losses = {}
        if args.kl_weight:
            losses["kl"] = logit_divergence(outputs.logits, teacher.logits.to(device), args.temperature,
                                            args.divergence, mask, beta=args.beta)
        if args.ce_weight:
            if labels is None:
                raise ValueError("ce_weight > 0 needs labels in the batch")
            logits = outputs.logits[:, :-1].float()
            losses["ce"] = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       labels[:, 1:].reshape(-1).to(device), ignore_index=-100)
        if hidden:
            losses["hidden"] = hidden_mse(outputs.hidden_states, [h.to(device) for h in teacher.hidden_states],
                                          self.layer_map, self.projections, mask)
        if attentions:
            block_map = {s - 1: t - 1 for s, t in self.layer_map.items() if s > 0 and t > 0}
            losses["attention"] = attention_kl(outputs.attentions, [a.to(device) for a in teacher.attentions],
                                               block_map, mask)
        weights = {"kl": args.kl_weight, "ce": args.ce_weight, "hidden": args.hidden_weight,
                   "attention": args.attention_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        if model.training:
            self._record_terms(losses)
        return (loss, outputs) if return_outputs else loss

    # --- logging: each term's running mean beside Trainer's own loss ------------------------------
    def _record_terms(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value.detach())
        self._term_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            for name, total in self._term_sums.items():
                logs[f"loss_{name}"] = round(total / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
