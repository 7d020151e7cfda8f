"""The context a recipe's stages share: calibration data and windows, the tokenizer, the device,
the resume folder, the model as it entered the recipe (a distillation teacher)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import calibration_windows
from .data import bundled_text
from .errors import DataError
from .precision import model_compute_dtype
from .recipe import CalibrationConfig

logger = logging.getLogger(__name__)


@dataclass
class CompressionContext:
    """What stages may need beyond the model: calibration data, a tokenizer, a resume folder.
    Every stage runner takes it: ``runner(model, stage, config, context)``.

    Calibration windows are built on first use and shared by all stages of a recipe.
    """

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    calibration_data: Any = None  # overrides calibration.data: a path, a dataset or token windows
    tokenizer: Any = None
    tokenizer_source: tuple[str, dict] | None = None  # (path, kwargs) to load one lazily
    resume_dir: Path | None = None
    device: torch.device | None = None
    stage_index: int = 0
    original_model: nn.Module | None = None  # the model before the first stage, for ``teacher: original``
    vocab_size: int | None = None  # rows of the model's input embeddings: the token ids it accepts
    _windows: torch.Tensor | None = None

    def text_source(self):
        """Text (or token ids) for stages that train: the calibration data, else the bundled text."""
        data = self.calibration_data if self.calibration_data is not None else self.calibration.data
        return data if data is not None else bundled_text("calibration")

    def calibration_windows(self) -> torch.Tensor:
        if self._windows is None:
            data = self.calibration_data if self.calibration_data is not None else self.calibration.data
            if data is None:
                data = bundled_text("calibration")
                logger.info("no calibration data given: using the bundled text %s", data)
            self._windows = calibration_windows(self.tokenizer_for(data), data, self.calibration.samples,
                                                self.calibration.seq_len, self.calibration.seed, self.vocab_size)
            logger.info("calibration: %d windows of %d tokens", *self._windows.shape)
        return self._windows

    def tokenizer_for(self, data):
        """The tokenizer that reads ``data`` (None for token ids): the one given, else the model's own."""
        if self.tokenizer is None and not isinstance(data, torch.Tensor):
            if self.tokenizer_source is None:
                raise DataError("calibration text needs a tokenizer: pass tokenizer= to compress() (or token windows)")
            from transformers import AutoTokenizer

            path, kwargs = self.tokenizer_source
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        return self.tokenizer

    def compute_dtype(self, model: nn.Module) -> torch.dtype | None:
        """What calibration computes in (``None``: the model's own dtype); see ``calibration.compute_dtype``."""
        return model_compute_dtype(model, self.calibration.compute_dtype, self.device)
