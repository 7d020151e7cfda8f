"""Distillation: losses (pure functions), packed training data, and ``DistillationTrainer``."""

from .data import PackedBlocks, packed_dataset
from .losses import DIVERGENCES, attention_kl, hidden_mse, logit_divergence
from .trainer import DistillationTrainer, DistillationTrainingArguments, default_layer_map

__all__ = ["DIVERGENCES", "DistillationTrainer", "DistillationTrainingArguments", "PackedBlocks", "attention_kl",
           "default_layer_map", "hidden_mse", "logit_divergence", "packed_dataset"]
