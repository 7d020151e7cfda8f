"""``evaluate`` metric modules shipped with hfcompress, loadable offline::

    import evaluate, hfcompress.metrics
    metric = evaluate.load(hfcompress.metrics.metric_path("perplexity"))
    metric.compute(predictions=texts, model_id="path/to/model", seq_len=2048)  # or model=model, tokenizer=tokenizer
    # {'perplexities': [...], 'mean_perplexity': ..., 'perplexity': ..., 'nll': ..., 'tokens': ..., 'windows': ...}
"""

import os
from importlib.resources import files

METRICS = ("perplexity",)


def metric_path(name: str = "perplexity") -> str:
    """Local folder of a metric module, for ``evaluate.load(path)`` (no Hub access needed)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return os.fspath(files("hfcompress") / "metrics" / name)
