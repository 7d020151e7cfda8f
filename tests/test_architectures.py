"""A representative subset of ``benchmarks/architectures.py``: tiny model, GPTQ or RTN 4-bit,
save, reload with plain ``from_pretrained``, same logits, at most 10% of the decoder in float."""

import pytest

from hfcompress.testing.roundtrip import quantize_roundtrip

SUBSET = [
    "llama", "qwen3", "gemma3_text", "gemma3",  # dense; Gemma 3 multimodal (vision tower stays float)
    "phi3", "gpt_neox", "falcon",  # fused q/k/v (and gate/up)
    "starcoder2", "olmo2", "gpt2", "opt", "bert",
    "mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3",  # experts behind transformers' experts interface
    "dbrx", "llama4_text",  # experts the model multiplies itself: packed tensors
    "jamba", "granitemoehybrid",  # hybrids: Mamba layers between attention layers
]


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("model_type", SUBSET)
def test_quantized_tiny_model_reloads_identically(model_type, method):
    row = quantize_roundtrip(model_type, method)
    assert row["status"] == "ok", row


def test_a_model_that_does_not_run_on_token_ids_is_refused_clearly():
    row = quantize_roundtrip("musicgen", "gptq")  # its decoder takes one row of ids per codebook
    assert row["status"] == "refused" and "use method: rtn" in row["error"], row
    assert quantize_roundtrip("musicgen", "rtn")["status"] == "ok"
