"""Calibration: token windows from text, and the layer-by-layer runner that data-driven stages use.

:func:`walk_blocks` is the one block-by-block loop of every data-driven stage (GPTQ, pruning
importance). It yields each block with what the block receives for every calibration window;
the caller runs the windows through it with hooks on its linear layers (accumulating statistics,
replacing weights), and the walk then runs the windows again so that the next block sees this
block's outputs as modified. Only the current block moves to the compute device. No graph
tracing: only hooks, so any architecture whose stack of blocks the model registry finds works.

What a block receives besides its hidden states (attention masks, rotary embeddings, which
differ between sliding-window and full-attention layers, and anything else a model passes) is
recorded by running two probe windows through the whole model with a pre-hook on every block.
If those extra inputs are the same for both probes and every block's output is the next block's
input, the walk is *chained*: hidden states are captured once at the first block and carried
forward. Otherwise (inputs that depend on the tokens, hidden states transformed between blocks,
several streams per block) the walk *replays*: for each block it runs the windows through the
model, as compressed so far, up to that block and records each window's whole call. Both see
exactly what the model computes; chaining is just faster.

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

from .errors import CalibrationError, DataError
from .data import tokenize
from .precision import float32_block, float32_forward
from .residency import home_device, resident

logger = logging.getLogger(__name__)


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seq_len`` tokens at random offsets (fixed ``seed``), as GPTQ samples them."""
    ids = ids.flatten()
    if ids.numel() <= seq_len:
        raise DataError(f"the calibration text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_windows(tokenizer, data, samples: int, seq_len: int, seed: int,
                        vocab_size: int | None = None) -> torch.Tensor:
    """Token windows ``[samples, seq_len]`` from text (file, folder, dataset) or ready token ids.

    A 2-D tensor, or a ``.safetensors`` file holding one named ``input_ids``, is taken as windows
    already cut, and used whole; its ids are checked against ``vocab_size`` (the model's).
    """
    what = "the calibration windows"
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".safetensors"):
        from safetensors import safe_open

        windows_file_shape(data)  # a clear error for a file that is not windows
        what = str(data)
        with safe_open(data, "pt") as handle:
            data = handle.get_tensor("input_ids")
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return check_token_ids(data, vocab_size, what)
    return sample_windows(tokenize(tokenizer, data), samples, seq_len, seed)


def windows_file_shape(path: str | os.PathLike) -> tuple[int, int]:
    """``(windows, seq_len)`` of a ``.safetensors`` file of ready windows, from its header alone;
    a clear error when it is unreadable or holds no 2-D ``input_ids``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as handle:
            shape = handle.get_slice("input_ids").get_shape() if "input_ids" in handle.keys() else None
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path}: truncated or corrupt safetensors file ({str(err)[:160]}); write it again") from None
    if shape is None or len(shape) != 2:
        raise DataError(f"{path}: expected a tensor named input_ids of shape [windows, seq_len]")
    return shape[0], shape[1]


def check_token_ids(windows: torch.Tensor, vocab_size: int | None, what: str) -> torch.Tensor:
    """``windows`` as int64, refused unless they are whole token ids the model has: an id past
    the embedding table fails deep inside the forward pass with an indexing error."""
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise DataError(f"{what}: token ids must be integers, not {str(windows.dtype).removeprefix('torch.')}")
    if windows.numel() == 0:
        raise DataError(f"{what}: no token ids (shape {list(windows.shape)}); give at least one window")
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        limit = f"0..{vocab_size - 1}" if vocab_size is not None else "0 or more"
        raise DataError(f"{what}: token id {bad} is outside the model's vocabulary ({limit}); were they made with "
                        "this model's tokenizer?")
    return windows.long()


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


def _strip_cache(value):
    """No KV cache during calibration: a cache object passed to a block becomes None."""
    from transformers.cache_utils import Cache

    return None if isinstance(value, Cache) else value


_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _record_call(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs = {k: (None if k in _CACHE_KWARGS else _strip_cache(v)) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return tuple(_strip_cache(a) for a in args), kwargs


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """``(hidden_states, other args, other kwargs)`` of a block call."""
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@dataclass
class BlockInputs:
    """What one block receives for each calibration window.

    Chained: ``hidden`` ``[windows, seq_len, hidden]`` (on the offload device) plus ``args`` and
    ``kwargs`` shared by every window. Replayed: ``calls``, each window's whole ``(args, kwargs)``.
    """

    hidden: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)
    args: tuple = ()
    calls: list | None = None

    def __len__(self) -> int:
        return len(self.calls) if self.calls is not None else self.hidden.shape[0]

    def call(self, i: int, device: torch.device, dtype: torch.dtype | None = None) -> tuple[tuple, dict]:
        """Window ``i``'s call on ``device``; with ``dtype``, its floating-point tensors in that dtype."""
        if self.calls is not None:
            args, kwargs = self.calls[i]
            return _to(args, device, dtype), {k: _to(v, device, dtype) for k, v in kwargs.items()}
        return self._chained_call(self.hidden[i : i + 1], device, dtype)

    def call_all(self, device: torch.device, dtype: torch.dtype | None = None) -> tuple[tuple, dict]:
        """Every window of chained inputs in one call (what they share broadcasts over the windows)."""
        return self._chained_call(self.hidden, device, dtype)

    def _chained_call(self, hidden: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> tuple[tuple, dict]:
        x = _to(hidden, device, dtype)
        return (x, *_to(self.args, device, dtype)), {k: _to(v, device, dtype) for k, v in self.kwargs.items()}

    def window(self, i: int) -> BlockInputs:
        """Window ``i`` alone (chained: a view, so a run with ``update`` writes into these inputs)."""
        if self.calls is not None:
            return BlockInputs(calls=self.calls[i : i + 1])
        return BlockInputs(self.hidden[i : i + 1], self.kwargs, self.args)

    def head(self, n: int = 1) -> BlockInputs:
        """The first ``n`` windows."""
        if self.calls is not None:
            return BlockInputs(calls=self.calls[:n])
        return BlockInputs(self.hidden[:n], self.kwargs, self.args)


def compute_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` for calibration forwards (``None``, float32: none; autocast cannot raise
    precision, :func:`float32_block` does)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# A calibrated stage runs each window through every block about twice (once to collect the
# statistics, once more for the next block's inputs), plus hooks, Hessian products and the
# solver. Measured, GPTQ w4g64 of SmolLM2 on 32 windows of 2048 tokens (2-core CPU, float32
# compute), in block forwards per window and block: 2.85 and 3.1 in two runs.
PASSES_PER_WINDOW = 3.0


@torch.no_grad()
def estimate_calibration_seconds(model: nn.Module, samples: int, seq_len: int, dtype: torch.dtype | None,
                                 device: torch.device | None = None) -> tuple[float, float]:
    """``(seconds of one window through every block, estimated seconds of a calibrated stage on
    samples windows)``: the first block is timed on a random window as the stage computes it
    (``dtype`` from :func:`resolve_compute_dtype`); the walk's two probe windows count too."""
    import time

    from .models import decoder_blocks

    blocks = decoder_blocks(model)
    offload = home_device(model)
    device = device or offload
    vocab = model.get_input_embeddings().num_embeddings
    window = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with float32_forward(model, blocks) if dtype == torch.float32 else contextlib.nullcontext():
        inputs = capture_block_inputs(model, blocks[0], window, _input_device(model, device), offload)
    block = blocks[0].to(device)

    try:
        with float32_block(block) if dtype == torch.float32 else contextlib.nullcontext():
            run_block(block, inputs, device, dtype=dtype)  # the first call warms up kernels and caches
            begin = time.perf_counter()
            run_block(block, inputs, device, dtype=dtype)
            seconds = time.perf_counter() - begin
    finally:
        blocks[0].to(offload)
    window_seconds = seconds * len(blocks)
    return window_seconds, window_seconds * (samples * PASSES_PER_WINDOW + 2)  # + the two probe windows


def _input_device(model: nn.Module, device: torch.device | None) -> torch.device:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tensor = next(iter([*embed.parameters(), *embed.buffers()]), None) if embed is not None else None
    if tensor is None or tensor.is_meta:  # no table, or one read from disk when used (on the CPU)
        return device or home_device(model)
    return tensor.device


def _forward(model: nn.Module, window: torch.Tensor, device: torch.device) -> None:
    try:
        model(input_ids=window[None].to(device), use_cache=False)
    except _StopForward:
        pass


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (objects without a usable ==)
        return a is b


@torch.no_grad()
def probe_block_calls(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device):
    """Run ``windows`` through the model's blocks. Returns, per window, each block's extra inputs
    ``{block: (args, kwargs)}`` (hidden states left out) and whether every block's input was the
    previous block's output."""
    calls: list[dict[int, tuple]] = [{} for _ in windows]
    feeds = [True for _ in windows]
    current, previous = [0], [None]  # the window running; the last block output seen
    handles = []
    for b, block in enumerate(blocks):
        def pre(module, args, kwargs, b=b):
            hidden, args, kwargs = _split_hidden(*_record_call(args, kwargs))
            if b and (previous[0] is None or not _same(previous[0], hidden)):
                feeds[current[0]] = False
            calls[current[0]][b] = (args, kwargs)

        def post(module, args, kwargs, output, b=b):
            previous[0] = block_output(output)
            if b == len(blocks) - 1:
                # Nothing after the last block is recorded: the final norm and the output
                # projection (a vocabulary-wide matrix, read from disk for a model that lives
                # there, and logits of vocabulary x tokens) need not run.
                raise _StopForward

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        for w, window in enumerate(windows):
            current[0], previous[0] = w, None
            try:
                _forward(model, window, device)
            except Exception as error:  # the model itself, before any of our work: say what it needs
                raise CalibrationError(
                    f"{type(model).__name__} does not run on a window of token ids ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); calibrated methods feed it "
                    "model(input_ids=...): use method: rtn, or prepare the model so that it runs on token ids"
                ) from error
    finally:
        for handle in handles:
            handle.remove()
    return calls, feeds


def _chainable(calls, feeds, n_blocks: int) -> bool:
    """Whether the blocks' extra inputs are the same for both probes and each block feeds the next."""
    if not all(feeds) or any(set(c) != set(range(n_blocks)) for c in calls):
        return False
    return all(_same(calls[0][b], calls[1][b]) for b in range(n_blocks))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor, device: torch.device,
                         offload: torch.device = torch.device("cpu")) -> BlockInputs:
    """Each window's whole call of ``block``, the model run up to it (the replayed form)."""
    calls = []

    def grab(module, args, kwargs):
        args, kwargs = _record_call(args, kwargs)
        calls.append((_to(args, offload), {k: _to(v, offload) for k, v in kwargs.items()}))
        raise _StopForward

    _run_to(model, block, windows, device, grab, calls, "a block")
    first_args, first_kwargs = calls[0]
    for i, (args, kwargs) in enumerate(calls[1:], start=1):  # share what every window receives alike
        calls[i] = (tuple(a0 if j and _same(a, a0) else a for j, (a, a0) in enumerate(zip(args, first_args))),
                    {k: first_kwargs[k] if k in first_kwargs and _same(v, first_kwargs[k]) else v
                     for k, v in kwargs.items()})
    return BlockInputs(calls=calls)


def _first_hidden(model, first_block, windows, device, offload) -> torch.Tensor:
    """Hidden states of every window at the first block."""
    hidden = []

    def grab(module, args, kwargs):
        hidden.append((args[0] if args else kwargs["hidden_states"]).to(offload))
        raise _StopForward

    _run_to(model, first_block, windows, device, grab, hidden, "the first block")
    return torch.cat(hidden)


def _run_to(model, block, windows, device, grab, grabbed: list, what: str) -> None:
    """Run every window until ``block``, whose pre-hook ``grab`` records its call into ``grabbed`` and stops."""
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            _forward(model, window, device)
    finally:
        handle.remove()
    if len(grabbed) != len(windows):
        raise RuntimeError(f"{what} of {type(model).__name__} was not reached by the forward pass")


def block_output(output):
    """The hidden states a decoder block returns (first of a tuple, or the tensor itself)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, device: torch.device, update: bool = False,
              dtype: torch.dtype | None = None,
              observe: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
    """Run every window through ``block``; with ``update`` (chained inputs), write its outputs over
    the inputs.

    A forward may end early (a hook raising :class:`_StopForward` once it has what it needs).
    ``dtype`` bfloat16/float16 runs the block under autocast (hidden states stay in their own
    dtype); float32 feeds it float32 inputs (the walk has raised the block, :func:`float32_block`).
    ``observe(input, output)`` sees each window's hidden states before and after the block.
    """
    for i in range(len(inputs)):
        args, kwargs = inputs.call(i, device, torch.float32 if dtype == torch.float32 else None)
        x = args[0] if args else kwargs.get("hidden_states")
        try:
            with compute_context(device, dtype):
                out = block_output(block(*args, **kwargs))
        except _StopForward:
            continue
        if observe is not None:
            observe(x, out)
        if update and inputs.calls is None:
            inputs.hidden[i : i + 1] = out.to(inputs.hidden.device, inputs.hidden.dtype)


@torch.no_grad()
def run_block_together(block: nn.Module, inputs: BlockInputs, device: torch.device,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every window of chained ``inputs`` through ``block`` in one call; returns the block's outputs
    ``[windows, seq_len, hidden]`` (float32 where ``dtype`` is, as :func:`run_block` computes). A hook
    then sees every window's input at once, at the cost of all windows' activations in memory."""
    if inputs.calls is not None:
        raise ValueError("run_block_together takes chained inputs (one hidden-state tensor for all windows)")
    args, kwargs = inputs.call_all(device, torch.float32 if dtype == torch.float32 else None)
    with compute_context(device, dtype):
        return block_output(block(*args, **kwargs))


def _to(value, device, dtype: torch.dtype | None = None):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_to(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


@dataclass
class BlockStep:
    """One step of :func:`walk_blocks`: block ``index`` (named ``name``) and what it receives."""

    index: int
    name: str
    block: nn.Module
    inputs: BlockInputs
    hooks: list = field(default_factory=list)  # handles the walk's own pass runs, then removes
    reached: bool = True  # False: the forward pass skips this block (cross-attention without an image)
    # Set by the caller once it has written the block's outputs over the (chained) inputs itself:
    # the walk's own pass is then skipped.
    outputs_written: bool = False


def walk_blocks(model: nn.Module, windows: torch.Tensor, device: torch.device | None = None,
                dtype: torch.dtype | None = None, start: int = 0, restore: Callable | None = None,
                observe: Callable | None = None, after: Callable | None = None) -> Iterator[BlockStep]:
    """Yield every block (from ``start``) with its calibration inputs, on ``device``.

    After the caller's work on a step, the walk runs the windows through the block again (so the
    next block sees its outputs as the caller left it; hooks the caller put in ``step.hooks`` see
    this pass and are removed after it), unless the caller has written the outputs over the
    inputs itself (``step.outputs_written``), calls ``after(step)`` (the inputs now hold the next
    block's hidden states) and moves the block back to the offload device.
    ``restore(hidden)`` runs first when resuming at ``start``: it puts back what earlier blocks
    became, and the hidden states at block ``start`` of a chained walk (``None`` when replaying).
    ``observe(index, input, output)`` sees each window's hidden states around each block.
    A block that the forward pass never reaches comes with ``reached=False`` and empty inputs;
    nothing runs through it (the model skips it too) and ``after`` is not called for it.
    ``dtype`` (see :func:`resolve_compute_dtype`): bfloat16/float16 autocast, or float32, which
    raises each block to float32 for its step and carries the hidden states in float32.
    """
    from .models import block_names, decoder_blocks

    blocks = decoder_blocks(model)
    names = block_names(model)
    offload = home_device(model)
    device = device or offload
    input_device = _input_device(model, device)
    upcast = dtype == torch.float32
    # Whole-model forwards (probes, the first block's inputs, replays) compute in float32 too: the
    # hidden states, rotary tables and masks the blocks receive are then those of a float32 model.
    whole = (lambda: float32_forward(model, blocks)) if upcast else contextlib.nullcontext
    probes = torch.stack([windows[0], windows[1] if len(windows) > 1 else windows[0].flip(0)])
    with whole():
        calls, feeds = probe_block_calls(model, blocks, probes, input_device)
    chained = _chainable(calls, feeds, len(blocks))
    if not chained:
        logger.info("calibration replays the model up to each block (its blocks take token-dependent inputs or "
                    "do not feed each other directly)")
    with whole():
        hidden = _first_hidden(model, blocks[0], windows, input_device, offload) if chained else None
    if start and restore is not None:
        restore(hidden)
    for b in range(start, len(blocks)):
        if b not in calls[0]:
            logger.warning("%s is not reached by the forward pass; nothing to calibrate there", names[b])
            yield BlockStep(b, names[b], blocks[b], BlockInputs(), reached=False)
            continue
        if chained:
            args, kwargs = calls[0][b]
            inputs = BlockInputs(hidden, kwargs, args)
        else:
            with whole():
                inputs = capture_block_inputs(model, blocks[b], windows, input_device, offload)
        with resident(model, names[b]):  # a model on disk: this block read in now, written back after
            block = blocks[b].to(device)
            with float32_block(block) if upcast else contextlib.nullcontext():
                step = BlockStep(b, names[b], block, inputs)
                yield step
                watch = (lambda x, out, b=b: observe(b, x, out)) if observe is not None else None
                try:
                    if step.outputs_written and (watch is not None or step.hooks):
                        raise RuntimeError("walk_blocks: a step whose outputs the caller wrote runs no pass for "
                                           "observe or step.hooks to see")
                    if not step.outputs_written and (chained or watch is not None or step.hooks):
                        run_block(step.block, inputs, device, update=chained, dtype=dtype, observe=watch)
                finally:
                    for handle in step.hooks:
                        handle.remove()
                if after is not None:
                    after(step)
            blocks[b].to(offload)


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
