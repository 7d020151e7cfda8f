"""Uniform head + FFN pruning of dense families saves checkpoints that plain transformers loads.

One process, which cannot import hfcompress at all, loads every pruned folder, checks its logits
against those the pruned model gave before saving, and generates.
"""

from __future__ import annotations

import json

import pytest
import torch

import hfcompress
from hfcompress.models import decoder_blocks
from hfcompress.pruning import layout_of
from hfcompress.testing import tiny_inputs, tiny_model
from hfcompress.testing.stock import run_without_hfcompress

# Dense families whose config can describe fewer heads (a head_dim key, or one derived from
# widths the cut keeps) and a narrower FFN.
PLAIN = ["llama", "qwen3", "gemma3_text", "phi3", "olmo2", "granite", "starcoder2", "mistral", "qwen2", "gemma2",
         "cohere", "glm", "smollm3", "olmo", "exaone4", "phi", "nemotron", "ernie4_5"]
# Their configs derive the head size from hidden_size / num_attention_heads and build the
# attention projections from hidden_size: fewer heads cannot be written into a config, so a
# head cut is recorded for hfcompress to rebuild; an FFN cut stays plain.
FFN_ONLY = ["gpt_neox", "falcon", "stablelm"]

LOADER = """  # run where hfcompress cannot be imported
import json, sys, torch
from transformers import AutoModelForCausalLM
out = {}
for family, (folder, ids) in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False, min_new_tokens=4)
    out[family] = {"sum": float(logits.double().sum()), "generated": generated.shape[1]}
print(json.dumps(out))
"""


def _prune_and_save(family, folder, **stage):
    model = tiny_model(family)
    inputs = tiny_inputs(model, batch=4, seq_len=32)["input_ids"]
    before = layout_of(model).sizes(decoder_blocks(model)[0])
    hfcompress.compress(model, {"stages": [{"prune": stage}]}, calibration_data=inputs)
    after = layout_of(model).sizes(decoder_blocks(model)[0])
    assert getattr(model.config, "quantization_config", None) is None, f"{family} needs hfcompress to reload"
    with torch.no_grad():
        expected = float(model(input_ids=inputs[:2]).logits.double().sum())
    model.save_pretrained(folder)
    return before, after, expected, inputs[:2].tolist()


def test_pruned_dense_families_load_and_generate_without_hfcompress(tmp_path):
    jobs, expected = {}, {}
    for family in PLAIN + FFN_ONLY:
        stage = {"ffn": 0.25} if family in FFN_ONLY else {"heads": 0.5, "ffn": 0.25}
        before, after, expected[family], ids = _prune_and_save(family, tmp_path / family, **stage)
        assert after.ffn == before.ffn - round(0.25 * before.ffn), family
        if family not in FFN_ONLY:
            assert after.heads < before.heads, family
        jobs[family] = (str(tmp_path / family), ids)
    loaded = run_without_hfcompress(LOADER, json.dumps(jobs))
    for family, result in loaded.items():
        assert result["generated"] == 12, family
        assert result["sum"] == pytest.approx(expected[family], rel=1e-5, abs=1e-3), family


@pytest.mark.parametrize("family", FFN_ONLY)
def test_head_cuts_a_config_cannot_describe_are_recorded_and_reload_with_hfcompress(tmp_path, family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, batch=4, seq_len=32)["input_ids"]
    gqa = "per_group" if family == "falcon" else "groups"  # falcon: multi-query, one key/value group
    hfcompress.compress(model, {"stages": [{"prune": {"heads": 0.5, "gqa": gqa}}]}, calibration_data=inputs)
    assert model.config.quantization_config.pruned  # the record hfcompress rebuilds from
    with torch.no_grad():
        expected = model(input_ids=inputs[:2]).logits
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(input_ids=inputs[:2]).logits, expected)
