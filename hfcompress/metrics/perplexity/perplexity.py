"""Perplexity as an ``evaluate`` metric: evaluate's per-text perplexities and hfcompress's corpus perplexity.

evaluate's own perplexity metric lives on the Hugging Face Hub; this one loads from a local path,
returns the same ``perplexities`` (one per text) and ``mean_perplexity``, and beside them the
corpus perplexity by the GPTQ paper's protocol (``perplexity``, ``nll``, ``tokens``, ``windows``).
The model is a path or Hub id (``model_id``), or a model already in memory (``model`` or
``model_id``), used as it is: a model compressed by hfcompress is scored without a reload.

>>> import evaluate, hfcompress.metrics
>>> from tokenizers import Tokenizer, models, pre_tokenizers
>>> from transformers import PreTrainedTokenizerFast
>>> from hfcompress.testing import tiny_model
>>> bytes_bpe = models.BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, [])
>>> backend = Tokenizer(bytes_bpe); backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
>>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)  # one token per byte
>>> model = tiny_model("llama")  # random weights; a path or a Hub id works as well
>>> perplexity = evaluate.load(hfcompress.metrics.metric_path("perplexity"))
>>> out = perplexity.compute(predictions=["Happy birthday!", "It is a truth universally acknowledged."],
...                          model=model, tokenizer=tokenizer, add_start_token=False, seq_len=32)
>>> list(out), len(out["perplexities"]), out["windows"], out["tokens"]
(['perplexities', 'mean_perplexity', 'perplexity', 'nll', 'tokens', 'windows'], 2, 1, 31)
"""

import logging
import os

import datasets
import evaluate
import torch
import torch.nn.functional as F

from hfcompress.errors import DataError
from hfcompress.evaluation import evaluate_perplexity, forward_precision
from hfcompress.io import load_model

# evaluate imports this file under a cache-derived module name: log under a stable one.
logger = logging.getLogger("hfcompress.metrics.perplexity")

_DESCRIPTION = """Perplexity of a causal language model, two ways. Per text, as evaluate's own perplexity
metric: exp of the mean negative log-likelihood of each text's tokens (`perplexities`) and their mean
(`mean_perplexity`). Over the corpus, as in the GPTQ paper: the texts are joined with a blank line,
tokenized whole and cut into non-overlapping windows of `seq_len` tokens (or strided windows)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str or model): a model folder, a .gguf file or a Hub id (compressed hfcompress folders
        work too), or a loaded causal LM, used as it is.
    model (optional): a loaded causal LM, instead of `model_id`.
    tokenizer (optional): the tokenizer; loaded with the model (or from `model.name_or_path`) if omitted.
    batch_size (int): texts per forward pass for `perplexities`. Defaults to 16.
    add_start_token (bool): put the tokenizer's BOS token before each text, so that the first word is
        scored too. Defaults to True (without a BOS token, texts are scored as they are).
    max_length (int, optional): score only the first `max_length` tokens of each text, BOS included.
    device (str, optional): where a model loaded from `model_id` runs; defaults to "cuda" when
        available. A model object stays where it is.
    seq_len (int): tokens per corpus window. Defaults to 2048; a corpus shorter than that is one window.
    stride (int, optional): strided corpus windows instead of non-overlapping ones.
    max_windows (int, optional): score only the first corpus windows.
    dtype (str): dtype to load `model_id` in ("auto", "float32", "bfloat16"). Defaults to "auto".
    compute_dtype (str, optional): what the forwards compute in. Defaults to "auto": the model's dtype
        where the hardware has it, else float32; "bfloat16"/"float16": autocast; None: the model's.
Returns:
    perplexities (one per text), mean_perplexity, and over the corpus: perplexity, nll (mean nats
    per token), tokens (scored), windows.
"""

_CITATION = """@article{frantar2022gptq, title={GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers}, author={Frantar, Elias and Ashkboos, Saleh and Hoefler, Torsten and Alistarh, Dan},
journal={arXiv preprint arXiv:2210.17323}, year={2022}}"""


def _model_and_tokenizer(model_id, model, tokenizer, dtype, device):
    if model_id is not None and model is not None:
        raise ValueError("pass the model as model_id or as model, not both")
    model = model_id if model is None else model
    if model is None:
        raise ValueError("pass model_id (a folder, .gguf file or Hub id, or a loaded model) or model")
    if isinstance(model, (str, os.PathLike)):
        model, loaded_tokenizer, _ = load_model(model, dtype=dtype)
        device = "cuda" if device == "gpu" else device  # evaluate's spelling
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = loaded_tokenizer if tokenizer is None else tokenizer
    elif device is not None:
        # Moving the caller's model would be a side effect: it stays where they put it.
        raise ValueError("device= applies to a model loaded from a path; move a model object yourself")
    elif tokenizer is None and getattr(model, "name_or_path", ""):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=")
    return model, tokenizer


@torch.inference_mode()
def text_perplexities(model, tokenizer, texts, batch_size=16, add_start_token=True, max_length=None, dtype="auto"):
    """Perplexity of each text on its own, as evaluate's metric defines it: exp(mean NLL of its tokens)."""
    bos = tokenizer.bos_token_id if add_start_token else None
    if add_start_token and max_length and bos is None:
        raise ValueError("max_length with add_start_token=True needs a tokenizer with a BOS token")
    # max_length counts the BOS token, as in evaluate.
    limit = max_length - 1 if add_start_token and max_length else max_length
    rows = []
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False).input_ids):
        ids = ([bos] if bos is not None else []) + ids[:limit]
        if len(ids) < 2:  # the first token has no prediction: one token leaves nothing to score
            raise DataError(f"text {i} has {len(ids)} token(s) to score from, at least 2 are needed "
                            "(drop empty texts, or use add_start_token=True with a tokenizer that has a BOS token)")
        rows.append(ids)
    device = next(model.parameters()).device
    precision = forward_precision(model, dtype)[1]
    was_training = model.training
    model.eval()
    perplexities = []
    with precision():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            # Padding on the right, whatever the tokenizer's side: every text keeps positions 0..n-1 and
            # causal attention never reaches the padding after it, so a text scores as it would alone.
            ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            # Token t is predicted by the logits at t - 1; padding is not scored.
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
            scored = mask[:, 1:]
            perplexities += torch.exp((nll * scored).sum(1) / scored.sum(1)).tolist()
    model.train(was_training)
    return perplexities


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id=None, model=None, tokenizer=None, batch_size=16, add_start_token=True,
                 max_length=None, device=None, seq_len=2048, stride=None, max_windows=None, dtype="auto",
                 compute_dtype="auto"):
        model, tokenizer = _model_and_tokenizer(model_id, model, tokenizer, dtype, device)
        perplexities = text_perplexities(model, tokenizer, predictions, batch_size=batch_size,
                                         add_start_token=add_start_token, max_length=max_length, dtype=compute_dtype)
        ids = tokenizer("\n\n".join(predictions), return_tensors="pt").input_ids[0]
        if stride is None and 1 < ids.numel() < seq_len:
            # A few short texts (evaluate's usual input) would fit no window: score them as one
            # shorter window rather than fail; tokens and windows say what was scored.
            logger.warning("the texts have %d tokens, fewer than seq_len=%d: one window of %d", ids.numel(),
                           seq_len, ids.numel())
            seq_len = ids.numel()
        corpus = evaluate_perplexity(model, tokenizer, ids, seq_len=seq_len, stride=stride, max_windows=max_windows,
                                     compute_dtype=compute_dtype, progress=False)
        return {"perplexities": perplexities, "mean_perplexity": sum(perplexities) / len(perplexities),
                "perplexity": corpus.perplexity, "nll": corpus.nll, "tokens": corpus.tokens,
                "windows": corpus.windows}
