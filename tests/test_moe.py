"""Mixture-of-Experts: experts quantized, calibrated, used at inference, reloaded, pruned."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.models import ExpertLinears, find_expert_linears, find_fused_experts
from hfcompress.quantization.qlinear import QuantLinear
from hfcompress.testing import tiny_model

WINDOWS = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(0))


def logits(model, ids=WINDOWS[:2]):
    with torch.no_grad():
        return model(input_ids=ids).logits


def gptq(**options):
    return {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, **options}}]}


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_quantized_experts_are_used_and_reload_identically(tmp_path, family):
    model = tiny_model(family)
    float_logits = logits(model)
    hfcompress.compress(model, gptq(), calibration_data=WINDOWS)
    experts = find_expert_linears(model)
    assert experts and not find_fused_experts(model)
    for module in experts.values():
        assert all(isinstance(m, QuantLinear) for expert in module for m in expert.children())
    quantized = logits(model)
    assert not torch.allclose(quantized, float_logits)
    saved = {}
    for name, module in experts.items():  # the packed experts are what runs: silence them and the output moves
        for i, expert in enumerate(module):
            saved[(name, i)] = expert.down_proj.scales.clone()
            expert.down_proj.scales.zero_()
    assert not torch.allclose(logits(model), quantized)
    for (name, i), scales in saved.items():
        experts[name][i].down_proj.scales.copy_(scales)
    assert torch.equal(logits(model), quantized)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(next(iter(find_expert_linears(reloaded).values())), ExpertLinears)
    assert torch.equal(logits(reloaded), quantized)


def test_unfused_experts_compute_what_the_fused_ones_do():
    for family in ("mixtral", "gpt_oss", "qwen3_moe"):
        model = tiny_model(family)
        before = logits(model)
        hfcompress.models.unfuse_experts(model)
        assert torch.allclose(logits(model), before, atol=1e-5), family


def test_every_expert_is_calibrated_with_calibrate_all(caplog):
    model = tiny_model("mixtral", num_local_experts=8, num_experts_per_tok=1)
    hfcompress.models.unfuse_experts(model)
    firsts = [expert.first for m in find_expert_linears(model).values() for expert in m]
    seen = {id(f): 0 for f in firsts}
    handles = [f.register_forward_pre_hook(lambda m, a: seen.__setitem__(id(m), seen[id(m)] + a[0].shape[0]))
               for f in firsts]
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        hfcompress.compress(model, gptq(experts={"calibrate_all": True, "min_tokens": 8}),
                            calibration_data=WINDOWS[:1, :8])
    for handle in handles:
        handle.remove()
    assert all(count >= 8 for count in seen.values())  # 8 tokens each, whatever the router picked
    assert "rounded to nearest" not in caplog.text


def test_a_starved_expert_falls_back_to_rtn_and_the_log_names_it(caplog):
    model = tiny_model("mixtral", num_local_experts=8, num_experts_per_tok=1)
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        hfcompress.compress(model, gptq(experts={"min_tokens": 8}), calibration_data=WINDOWS[:1, :8])
    # 8 tokens, top-1 routing over 8 experts: some expert receives fewer than 8.
    assert "rounded to nearest (RTN)" in caplog.text
    assert "mlp.experts." in caplog.text and "calibration tokens" in caplog.text
    for module in find_expert_linears(model).values():  # the starved experts are packed all the same
        assert all(isinstance(m, QuantLinear) for expert in module for m in expert.children())


def test_routers_stay_in_float_unless_asked():
    model = tiny_model("qwen2_moe")
    hfcompress.compress(model, {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
    gate = model.model.layers[0].mlp.shared_expert_gate
    assert isinstance(gate, torch.nn.Linear)
    model = tiny_model("qwen2_moe")
    hfcompress.compress(model, {"stages": [{"quantize": {"bits": 4, "group_size": 32, "routers": True}}]})
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, QuantLinear)


def test_inspect_reports_under_five_bits_for_a_4bit_g32_mixtral(tmp_path):
    model = tiny_model("mixtral", intermediate_size=256, num_local_experts=8, vocab_size=128)
    hfcompress.compress(model, {"stages": [{"quantize": {"bits": 4, "group_size": 32, "lm_head": True,
                                                         "embeddings": {"bits": 4, "group_size": 32}}}]})
    model.save_pretrained(tmp_path)
    summary = hfcompress.report.summarize_folder(tmp_path)
    assert summary["bits_per_weight"] < 5, summary
    assert summary["float_share"] < 0.01


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_pruning_saves_a_checkpoint_plain_transformers_loads(tmp_path, family):
    model = tiny_model(family)  # 4 experts, top-2
    hfcompress.compress(model, {"stages": [{"prune": {"experts": 0.25}}]}, calibration_data=WINDOWS)
    experts = next(iter(find_fused_experts(model).values()))
    assert experts.num_experts == 3 and experts.down_proj.shape[0] == 3
    assert getattr(model.config, "quantization_config", None) is None
    expected = logits(model)
    model.save_pretrained(tmp_path)
    script = (  # a process that never imports hfcompress
        "import json, sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        f"ids = torch.tensor({WINDOWS[:2].tolist()})\n"
        "out = m.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)\n"
        "with torch.no_grad(): l = m(input_ids=ids).logits\n"
        "print(json.dumps({'plugin': 'hfcompress' in sys.modules, 'n': out.shape[1], 'sum': float(l.double().sum())}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    assert result["plugin"] is False and result["n"] == 12
    assert result["sum"] == pytest.approx(float(expected.double().sum()), rel=1e-5)
