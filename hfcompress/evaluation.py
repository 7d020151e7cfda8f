"""Perplexity, by the GPTQ paper's protocol (non-overlapping windows) or with a sliding stride.

Non-overlapping: the whole text is tokenized once and cut into ``n = tokens // seq_len``
windows (the remainder is dropped); each window is scored on its own and the perplexity is
``exp(mean NLL)`` over all predicted tokens. Strided: windows of at most ``seq_len`` tokens start
every ``stride`` tokens and only the tokens not scored by the previous window count, so every
token but the first is scored once, with up to ``seq_len - stride`` tokens of context before it.

>>> import torch
>>> from transformers import GPT2Config, GPT2LMHeadModel
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
>>> ids = torch.randint(0, 50, (300,))
>>> result = evaluate_perplexity(model, None, ids, seq_len=100, progress=False)
>>> result.windows, result.tokens
(3, 297)
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import tokenize
from .errors import DataError
from .precision import float32_block, float32_forward, model_compute_dtype
from .residency import home_device

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored
    windows: int
    seq_len: int
    stride: int | None
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _windows(n_tokens: int, seq_len: int, stride: int | None, max_windows: int | None):
    """(begin, end, scored) triples: score the last ``scored`` tokens of ``ids[begin:end]``."""
    if stride is None:
        spans = [(i * seq_len, (i + 1) * seq_len, seq_len) for i in range(n_tokens // seq_len)]
    else:
        spans, scored_until = [], 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + seq_len, n_tokens)
            spans.append((begin, end, end - scored_until))
            scored_until = end
            if end == n_tokens:
                break
    return spans[:max_windows] if max_windows else spans


def forward_precision(model, dtype: torch.dtype | str | None = "auto") -> tuple[torch.dtype | None, Callable]:
    """``(the dtype forwards compute in or None for the model's own, a factory of the context each
    forward runs in)`` for a ``dtype`` name as :func:`evaluate_perplexity` takes it."""
    device = home_device(model)  # the CPU for a model whose weights rest on disk
    dtype = model_compute_dtype(model, str(dtype).removeprefix("torch.") if dtype is not None else None, device)
    if dtype is None:
        return None, contextlib.nullcontext
    if dtype != torch.float32:
        return dtype, lambda: torch.autocast(device.type, dtype=dtype)
    from .models import ArchitectureError, decoder_blocks

    try:
        blocks = list(decoder_blocks(model))
    except ArchitectureError:  # no block stack found: the whole model raised for each forward
        return dtype, lambda: float32_block(model)
    return dtype, lambda: float32_forward(model, blocks)


@torch.inference_mode()
def evaluate_perplexity(
    model,
    tokenizer,
    data: Any,
    seq_len: int = 2048,
    stride: int | None = None,
    max_windows: int | None = None,
    compute_dtype: torch.dtype | str | None = "auto",
    batch_size: int = 1,
    progress: bool = True,
    **text_kwargs,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``data`` (text file, folder, dataset, name or token ids).

    ``compute_dtype`` is what the forward passes compute in, never what the weights are stored in:
    ``"auto"`` (default) the model's own dtype where the hardware computes it natively, else
    float32 (a bfloat16 model on a CPU without bf16 instructions); ``"bfloat16"``/``"float16"``
    autocast; ``"float32"`` raises a lower-precision model's weights while they compute; ``None``
    the model's own dtype. ``text_kwargs`` go to :func:`hfcompress.data.load_text` (``split``,
    ``config_name``, ``text_column``).
    """
    if stride is not None and not 0 < stride <= seq_len:
        raise ValueError(f"stride={stride} must be in [1, seq_len={seq_len}]")
    ids = tokenize(tokenizer, data, **text_kwargs)
    spans = _windows(ids.numel(), seq_len, stride, max_windows)
    if not spans or spans[0][1] - spans[0][0] < 2:
        raise DataError(f"the text has {ids.numel()} tokens, too few for one window of seq_len={seq_len}")
    device = home_device(model)  # the CPU for a model whose weights rest on disk
    if "dtype" in text_kwargs:  # its name before calibration and the CLI agreed on one
        warnings.warn("evaluate_perplexity(dtype=...) is now compute_dtype=...", FutureWarning, stacklevel=3)
        compute_dtype = text_kwargs.pop("dtype")
    dtype, precision = forward_precision(model, compute_dtype)
    total_nll, total_tokens = 0.0, 0
    batches = [spans[i : i + batch_size] for i in range(0, len(spans), batch_size)]
    was_training = model.training
    model.eval()
    # Entered once: a lower-precision model's embeddings and head are raised once, not per window.
    with precision():
        for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
            # Strided windows can differ in length (the last one); those go one by one.
            groups = [batch] if len({e - b for b, e, _ in batch}) == 1 else [[s] for s in batch]
            for group in groups:
                inputs = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
                logits = model(input_ids=inputs, use_cache=False).logits
                for row, (b, e, scored) in enumerate(group):
                    # Token t is predicted by the logits at t - 1; the first token of a window has none.
                    scored = min(scored, e - b - 1)
                    pred = logits[row, -scored - 1 : -1].float()
                    target = inputs[row, -scored:]
                    total_nll += F.cross_entropy(pred, target, reduction="sum").item()
                    total_tokens += scored
    model.train(was_training)
    nll = total_nll / total_tokens
    result = PerplexityResult(
        perplexity=math.exp(nll), nll=nll, tokens=total_tokens, windows=len(spans), seq_len=seq_len,
        stride=stride, dtype=str(dtype).removeprefix("torch.") if dtype is not None else str(model.dtype).removeprefix("torch."),
    )
    logger.info("perplexity %.4f over %d tokens in %d windows", result.perplexity, result.tokens, result.windows)
    return result
