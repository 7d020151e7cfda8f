"""Perplexity: the windowing protocols, against a hand computation, and the evaluate module."""

import math

import pytest
import torch
import torch.nn.functional as F

from hfcompress.errors import DataError
from hfcompress.evaluation import _windows, evaluate_perplexity

from conftest import W4G64, tiny_llama


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
    bf16 = evaluate_perplexity(model, None, ids, seq_len=128, max_windows=2, compute_dtype="bfloat16", progress=False)
    assert fp32.windows == 2 and bf16.dtype == "bfloat16"
    assert bf16.nll == pytest.approx(fp32.nll, rel=0.02) and bf16.nll != fp32.nll
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights alone
    with pytest.warns(FutureWarning, match="now compute_dtype"):  # the old keyword still works
        old = evaluate_perplexity(model, None, ids, seq_len=128, max_windows=2, dtype="bfloat16", progress=False)
    assert old.nll == bf16.nll


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
    assert len(out["perplexities"]) == 1 and out["mean_perplexity"] == pytest.approx(out["perplexities"][0])


TEXTS = ["It is a truth universally acknowledged, that a single man in possession of a good fortune",
         "Happy birthday!", "must be in want of a wife."]


def direct_perplexity(model, ids):
    """exp(mean NLL) of one text's token ids, the text alone in the batch, without padding."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


@pytest.mark.parametrize("add_start_token, max_length", [(False, None), (True, 6)])
def test_evaluate_metric_per_text_perplexities(tokenizer, add_start_token, max_length):
    import evaluate
    from transformers import PreTrainedTokenizerFast

    import hfcompress.metrics

    # The test tokenizer has no BOS token: this copy uses <eos> (id 0, tiny_llama's bos_token_id) as one.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<eos>",
                                        bos_token="<eos>")
    model = tiny_llama()
    metric = evaluate.load(hfcompress.metrics.metric_path("perplexity"))
    # batch_size=2: the texts have different lengths, so batches are padded, and the last is smaller.
    out = metric.compute(predictions=TEXTS, model=model, tokenizer=tokenizer, batch_size=2,
                         add_start_token=add_start_token, max_length=max_length)
    assert {"perplexities", "mean_perplexity", "perplexity", "nll", "tokens", "windows"} <= set(out)
    assert len(out["perplexities"]) == len(TEXTS)
    for text, perplexity in zip(TEXTS, out["perplexities"]):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ids = [0] + ids[: max_length - 1] if add_start_token else ids  # max_length counts the BOS token
        assert perplexity == pytest.approx(direct_perplexity(model, ids), rel=1e-5)
    assert out["mean_perplexity"] == pytest.approx(sum(out["perplexities"]) / len(TEXTS))
    # The corpus perplexity is still there: the joined texts, shorter than seq_len, make one window.
    assert out["windows"] == 1 and math.isfinite(out["perplexity"])
    with pytest.raises(DataError, match="text 1 has 1 token"):
        metric.compute(predictions=["It is", "a"], model=model, tokenizer=tokenizer, add_start_token=False)


def test_evaluate_metric_takes_a_compressed_model_object(tmp_path, tokenizer, monkeypatch):
    import evaluate

    import hfcompress
    import hfcompress.metrics

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = hfcompress.compress(tiny_llama(), W4G64)
    hfcompress.save_compressed(model, tmp_path / "w4", tokenizer)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))  # the object itself runs, not a reload
    metric = evaluate.load(hfcompress.metrics.metric_path("perplexity"))
    options = dict(predictions=TEXTS, seq_len=16, batch_size=2)
    from_path = metric.compute(model_id=str(tmp_path / "w4"), device="cpu", **options)
    assert not calls
    from_object = metric.compute(model=model, tokenizer=tokenizer, **options)
    assert calls
    assert from_object["windows"] == from_path["windows"] > 1
    for key in ("perplexities", "mean_perplexity", "perplexity", "nll"):
        assert from_object[key] == pytest.approx(from_path[key], rel=1e-5), key
    # model_id takes the object too, and then the tokenizer comes from its folder (name_or_path).
    model.name_or_path = str(tmp_path / "w4")
    assert metric.compute(model_id=model, **options)["perplexities"] == from_object["perplexities"]


def test_evaluation_keeps_no_autograd_graph():
    model = tiny_llama()
    tracked = []
    model.register_forward_hook(lambda module, args, output: tracked.append(output.logits.requires_grad))
    ids = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(4))
    evaluate_perplexity(model, None, ids, seq_len=128, progress=False)
    evaluate_perplexity(model.to(torch.bfloat16), None, ids, seq_len=128, compute_dtype="float32", progress=False)
    assert tracked == [False] * 4  # activations are freed as the forward goes, whatever the precision
