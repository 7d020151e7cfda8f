"""Perplexity as an ``evaluate`` metric, by hfcompress's protocol (GPTQ paper: non-overlapping windows).

evaluate's own perplexity metric lives on the Hugging Face Hub; this one loads from a local path:

    import evaluate, hfcompress.metrics
    perplexity = evaluate.load(hfcompress.metrics.metric_path("perplexity"))
    perplexity.compute(predictions=texts, model_id="path/or/hub-id", seq_len=2048)

The texts are joined with a blank line and scored as one corpus.
"""

import datasets
import evaluate

from hfcompress.evaluation import evaluate_perplexity
from hfcompress.io import load_model

_DESCRIPTION = """Corpus perplexity of a causal language model: the texts are joined, tokenized whole and cut
into non-overlapping windows of `seq_len` tokens (or strided windows), as in the GPTQ paper."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score, joined with a blank line.
    model_id (str): a model folder, a .gguf file or a Hub id; compressed hfcompress folders work too.
    seq_len (int): tokens per window. Defaults to 2048.
    stride (int, optional): strided windows instead of non-overlapping ones.
    max_windows (int, optional): score only the first windows.
    dtype (str): dtype to load the weights in ("auto", "float32", "bfloat16"). Defaults to "auto".
    compute_dtype (str, optional): autocast dtype, e.g. "bfloat16" (works on CPU).
Returns:
    perplexity, nll (mean nats per token), tokens (scored), windows.
"""

_CITATION = """@article{frantar2022gptq, title={GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers}, author={Frantar, Elias and Ashkboos, Saleh and Hoefler, Torsten and Alistarh, Dan},
journal={arXiv preprint arXiv:2210.17323}, year={2022}}"""


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, seq_len=2048, stride=None, max_windows=None, dtype="auto",
                 compute_dtype=None):
        model, tokenizer, _ = load_model(model_id, dtype=dtype)
        text = "\n\n".join(predictions)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        result = evaluate_perplexity(model, tokenizer, ids, seq_len=seq_len, stride=stride,
                                     max_windows=max_windows, dtype=compute_dtype, progress=False)
        return {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens,
                "windows": result.windows}
