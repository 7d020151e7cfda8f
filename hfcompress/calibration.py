"""Calibration: token windows from text, and the layer-by-layer runner that data-driven stages use.

The runner captures the inputs of the first block once (a pre-hook stops the forward there),
then walks the blocks in order. For each block it moves only that block to the compute device,
runs the calibration windows through it with forward hooks on its linear layers (the caller
accumulates statistics and replaces weights), then runs the windows again so that the next block
sees the outputs of this block as modified. Everything else stays where it is (CPU). No graph
tracing: only hooks, so any architecture whose blocks are listed in ``models.py`` works.

>>> import torch
>>> windows = sample_windows(torch.arange(1000), samples=4, seq_len=16, seed=0)
>>> windows.shape
torch.Size([4, 16])
>>> calibration_windows(None, windows, samples=128, seq_len=16, seed=0).shape  # ready windows: used whole
torch.Size([4, 16])
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DataError
from .evaluation import tokenize

logger = logging.getLogger(__name__)


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at random offsets (fixed ``seed``), as GPTQ samples them."""
    ids = ids.flatten()
    if ids.numel() <= seq_len:
        raise DataError(f"the calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_windows(tokenizer, data, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Token windows ``[samples, seq_len]`` from text (file, folder, dataset) or ready token ids.

    A 2-D tensor, or a ``.safetensors`` file holding one named ``input_ids``, is taken as windows
    already cut, and used whole.
    """
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".safetensors"):
        from safetensors.torch import load_file

        tensors = load_file(data)
        if "input_ids" not in tensors or tensors["input_ids"].dim() != 2:
            raise DataError(f"{data}: expected a tensor named input_ids of shape [windows, seq_len]")
        data = tensors["input_ids"]
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return data.long()
    return sample_windows(tokenize(tokenizer, data), samples, seq_len, seed)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


@dataclass
class BlockInputs:
    """What the first block receives: hidden states per window, and the keyword arguments."""

    hidden: torch.Tensor  # [windows, seq_len, hidden], on the offload device
    kwargs: dict = field(default_factory=dict)


def compute_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` for calibration forwards (``None``: the model's own precision)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor,
                         device: torch.device, offload: torch.device = torch.device("cpu")) -> BlockInputs:
    """Run each window up to ``first_block`` and record what it would receive."""
    hidden, captured = [], {}

    def grab(module, args, kwargs):
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(states.to(offload))
        if not captured:
            captured.update({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")})
            captured["use_cache"] = False
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(input_ids=window[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(hidden) != len(windows):
        raise RuntimeError(f"the first block of {type(model).__name__} was not reached by the forward pass")
    return BlockInputs(torch.cat(hidden), captured)


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device, update: bool = False,
              dtype: torch.dtype | None = None,
              observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Run every window through ``block``; with ``update``, write its outputs over the inputs.

    A forward may end early (a hook raising :class:`_StopForward` once it has what it needs).
    ``dtype`` runs the block under autocast (hidden states stay in their own dtype).
    ``observe(input, output)`` sees each window's hidden states before and after the block.
    """
    kwargs = {k: _to(v, device) for k, v in inputs.kwargs.items()}
    for i in range(inputs.hidden.shape[0]):
        x = inputs.hidden[i : i + 1].to(device)
        try:
            with compute_context(device, dtype):
                out = _block_output(block(x, **kwargs))
        except _StopForward:
            continue
        if observe is not None:
            observe(x, out)
        if update:
            inputs.hidden[i : i + 1] = out.to(inputs.hidden.device, inputs.hidden.dtype)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@contextmanager
def input_hooks(modules: dict[str, nn.Module], on_input: Callable[[str, torch.Tensor], None],
                stop_after: str | None = None) -> Iterator[None]:
    """Call ``on_input(name, x)`` with each module's input; stop the forward after ``stop_after``."""
    handles = []

    def make(name):
        def hook(module, args, output):
            on_input(name, args[0])
            if name == stop_after:
                raise _StopForward
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(make(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
