"""Perplexity: the windowing protocols, against a hand computation, and the evaluate module."""

import math

import pytest
import torch
import torch.nn.functional as F

from hfcompress.errors import DataError
from hfcompress.evaluation import _windows, evaluate_perplexity

from conftest import tiny_llama


def manual_nll(model, ids, seq_len):
    total, count = 0.0, 0
    for i in range(ids.numel() // seq_len):
        window = ids[i * seq_len : (i + 1) * seq_len][None]
        with torch.no_grad():
            logits = model(window).logits[0]
        total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
        count += seq_len - 1
    return total / count


def test_non_overlapping_windows_match_a_hand_computation():
    model = tiny_llama()
    ids = torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(0))
    result = evaluate_perplexity(model, None, ids, seq_len=128, progress=False)
    assert result.windows == 7 and result.tokens == 7 * 127
    assert result.nll == pytest.approx(manual_nll(model, ids, 128), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll))
    batched = evaluate_perplexity(model, None, ids, seq_len=128, batch_size=3, progress=False)
    assert batched.nll == pytest.approx(result.nll, rel=1e-5)


def test_strided_windows_score_every_token_once():
    spans = _windows(1000, seq_len=128, stride=64, max_windows=None)
    assert spans[0] == (0, 128, 128) and spans[1] == (64, 192, 64) and spans[-1][1] == 1000
    assert sum(scored for _, _, scored in spans) == 1000
    model = tiny_llama()
    ids = torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(1))
    result = evaluate_perplexity(model, None, ids, seq_len=128, stride=64, progress=False)
    assert result.tokens == 999  # every token but the first
    with pytest.raises(ValueError, match="stride=200"):
        evaluate_perplexity(model, None, ids, seq_len=128, stride=200, progress=False)


def test_max_windows_and_bf16_compute():
    model = tiny_llama()
    ids = torch.randint(0, 300, (1000,), generator=torch.Generator().manual_seed(2))
    fp32 = evaluate_perplexity(model, None, ids, seq_len=128, max_windows=2, progress=False)
    bf16 = evaluate_perplexity(model, None, ids, seq_len=128, max_windows=2, dtype="bfloat16", progress=False)
    assert fp32.windows == 2 and bf16.dtype == "bfloat16"
    assert bf16.nll == pytest.approx(fp32.nll, rel=0.02) and bf16.nll != fp32.nll
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights alone


def test_text_data_and_too_short_text(tmp_path, tokenizer):
    model = tiny_llama()
    (tmp_path / "t.txt").write_text("It is a truth universally acknowledged. " * 200)
    result = evaluate_perplexity(model, tokenizer, tmp_path / "t.txt", seq_len=64, progress=False)
    assert result.windows >= 5
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(DataError, match="too few for one window of seq_len=64"):
        evaluate_perplexity(model, tokenizer, tmp_path / "short.txt", seq_len=64, progress=False)


def test_evaluate_metric_module_loads_offline(tiny_llama_dir, monkeypatch):
    import evaluate

    import hfcompress.metrics

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = evaluate.load(hfcompress.metrics.metric_path("perplexity"))
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40
    out = metric.compute(predictions=[text], model_id=str(tiny_llama_dir), seq_len=64, max_windows=3)
    assert out["windows"] == 3 and out["tokens"] == 3 * 63
    assert math.isfinite(out["perplexity"]) and out["perplexity"] > 1
