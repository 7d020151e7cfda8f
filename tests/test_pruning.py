"""Structured pruning on tiny models of every family: shapes, reloads, selection and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import model_output, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt

import hfcompress
from hfcompress.pruning import PruningError, layout_of
from hfcompress.pruning.select import choose, head_units, remove_count
from hfcompress.pruning.layout import LayerSizes
from hfcompress.recipe import RecipeError

WINDOWS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def output(model, ids=WINDOWS[:2, :24]):
    return model_output(model, ids)


def prune(model, **stage):
    return hfcompress.compress(model, {"stages": [{"prune": stage}]}, calibration_data=WINDOWS)


def sizes(model):
    from hfcompress.models import decoder_blocks

    layout = layout_of(model)
    return [layout.sizes(block) for block in decoder_blocks(model)]


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("importance", ["activation", "magnitude", "taylor"])
def test_every_family_prunes_and_reloads_identically(tmp_path, family, importance):
    model = FAMILIES[family]()
    if importance == "taylor" and family == "bert":
        with pytest.raises(PruningError, match="LM head"):
            prune(model, heads=1, importance="taylor")
        return
    before = sizes(model)[0]
    heads = 3 if family == "llama" else 1  # llama: one of its two key/value groups of 3 query heads
    prune(model, heads=heads, ffn=0.25, importance=importance)
    after = sizes(model)
    assert all(s == after[0] for s in after)
    assert after[0].heads == before.heads - heads
    assert after[0].ffn == before.ffn - round(0.25 * before.ffn)
    expected = output(model)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(output(reloaded), expected)
    assert sizes(reloaded) == after


def test_pruning_nothing_is_the_identity():
    model = tiny_llama()
    expected = output(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, heads=0, ffn=0)
    assert torch.equal(output(model), expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert getattr(model.config, "quantization_config", None) is None


def test_removed_units_are_the_least_important():
    """Zero a head's output projection and an FFN channel's down column: magnitude removes them."""
    model = tiny_llama(num_hidden_layers=1)
    block = model.model.layers[0]
    with torch.no_grad():
        for proj in ("q_proj", "k_proj", "v_proj"):
            getattr(block.self_attn, proj).weight[64:96] *= 0.01  # key/value group 1 (heads 3..5) and its q heads
        block.self_attn.q_proj.weight[3 * 16 : 6 * 16] *= 0.01
        block.self_attn.o_proj.weight[:, 3 * 16 : 6 * 16] *= 0.01
        block.mlp.down_proj.weight[:, 7] = 0
        block.mlp.gate_proj.weight[7] = 0
        block.mlp.up_proj.weight[7] = 0
        kept_q = block.self_attn.q_proj.weight[: 3 * 16].clone()
        kept_down = torch.cat([block.mlp.down_proj.weight[:, :7], block.mlp.down_proj.weight[:, 8:]], 1).clone()
    prune(model, heads=3, ffn=1, importance="magnitude")
    assert torch.equal(block.self_attn.q_proj.weight, kept_q)
    assert torch.equal(block.mlp.down_proj.weight, kept_down)


def test_uniform_llama_is_a_plain_checkpoint(tmp_path):
    """No hfcompress in the config, and a Python without hfcompress imported loads and generates it."""
    model = tiny_llama()
    prune(model, heads=3, ffn=0.25)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (3, 1, 16)
    assert config["intermediate_size"] == 120
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'hfcompress' not in sys.modules\n"
        "ids = torch.tensor([[1, 2, 3, 4]])\n"
        "print(m.generate(ids, max_new_tokens=4, do_sample=False).shape[1])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == "8"


def test_gqa_groups_and_per_group():
    grouped = tiny_llama()
    prune(grouped, heads=0.5)  # 3 of 6 heads: one of the two key/value groups
    assert sizes(grouped)[0] == LayerSizes(heads=3, kv_heads=1, ffn=160)
    assert grouped.model.layers[0].self_attn.num_key_value_groups == 3
    per_group = tiny_llama()
    prune(per_group, heads=2, gqa="per_group")  # one query head out of each of the two groups
    assert sizes(per_group)[0] == LayerSizes(heads=4, kv_heads=2, ffn=160)
    assert per_group.model.layers[0].self_attn.num_key_value_groups == 2
    assert per_group.config.num_key_value_heads == 2 and per_group.config.num_attention_heads == 4
    output(per_group)


def test_a_ratio_that_is_not_a_whole_group_rounds_and_says_so(caplog):
    model = tiny_llama()
    with caplog.at_level("WARNING"):
        prune(model, heads=0.4)  # 2.4 heads; groups of 3 -> 3
    assert sizes(model)[0].heads == 3
    assert "rounding to 3" in caplog.text


def test_non_uniform_round_trips_with_identical_logits(tmp_path):
    model = tiny_llama(num_hidden_layers=3, num_key_value_heads=6)
    prune(model, heads=3, ffn=0.5, uniform=False)
    layer_sizes = sizes(model)
    assert sum(s.heads for s in layer_sizes) == 3 * 3 and sum(s.ffn for s in layer_sizes) == 3 * 80
    assert len(set(layer_sizes)) > 1
    expected = output(model)
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["pruned"]
    assert [LayerSizes(**s) for s in recorded["layers"]] == layer_sizes
    reloaded = type(model).from_pretrained(tmp_path)
    assert sizes(reloaded) == layer_sizes
    assert torch.equal(output(reloaded), expected)


def test_per_layer_overrides_cut_each_layer_its_own_amount_and_reload(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    reference = tiny_llama(num_hidden_layers=3)
    prune(model, ffn=0.25, overrides=[{"layers": [0, 2], "ffn": 0.5}, {"layers": [2], "heads": 3}])
    layer_sizes = sizes(model)
    full = sizes(reference)[0]
    assert [s.ffn for s in layer_sizes] == [full.ffn // 2, full.ffn - full.ffn // 4, full.ffn // 2]
    assert [s.heads for s in layer_sizes] == [full.heads, full.heads, full.heads - 3]
    expected = output(model)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert sizes(reloaded) == layer_sizes
    assert torch.equal(output(reloaded), expected)


def test_an_override_removes_the_layers_own_least_important_units():
    model = tiny_llama(num_hidden_layers=2)
    scores = [[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.05, 0.6]]
    assert choose(scores, [1, 2], uniform=True) == [{1}, {0, 2}]
    with pytest.raises(PruningError, match="uniform: true"):
        choose(scores, [1, 2], uniform=False)
    with pytest.raises(PruningError, match=r"layers \[5\] do not exist.*3 decoder layers"):
        prune(tiny_llama(num_hidden_layers=3), overrides=[{"layers": [5], "ffn": 0.5}])
    with pytest.raises(PruningError, match="leaves none"):
        prune(model, overrides=[{"layers": [1], "ffn": 160}])


def test_depth_pruning_drops_the_layer_that_changes_least(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: cosine 1
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    keep = [model.model.layers[0], model.model.layers[2]]
    expected = output(model)
    prune(model, layers=1)
    assert list(model.model.layers) == keep
    assert model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    torch.testing.assert_close(output(model), expected)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(reloaded.generate(WINDOWS[:1, :5], max_new_tokens=3, do_sample=False),
                       model.generate(WINDOWS[:1, :5], max_new_tokens=3, do_sample=False))


def test_hidden_channels_keep_the_tie(tmp_path):
    model = tiny_llama()
    prune(model, hidden=0.25)
    assert model.config.hidden_size == 72
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (96, 72)
    expected = output(model)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(output(reloaded), expected)


def test_scores_are_saved_and_reused(tmp_path):
    path = tmp_path / "scores.safetensors"
    first = tiny_llama()
    prune(first, heads=3, ffn=0.25, scores=str(path))
    assert path.exists()
    second = tiny_llama()
    hfcompress.compress(second, {"stages": [{"prune": {"heads": 3, "ffn": 0.25, "scores": str(path)}}]},
                        calibration_data=torch.zeros(1, 32, dtype=torch.long))  # would score differently
    assert torch.equal(output(first), output(second))
    with pytest.raises(PruningError, match="magnitude"):
        prune(tiny_llama(), heads=3, importance="magnitude", scores=str(path))


def test_prune_then_gptq_composes(tmp_path):
    model = tiny_llama()
    recipe = {"stages": [{"prune": {"heads": 3, "ffn": 0.25}},
                         {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}
    hfcompress.compress(model, recipe, calibration_data=WINDOWS)
    assert model.model.layers[0].mlp.down_proj.in_features == 120
    expected = output(model)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert torch.equal(output(reloaded), expected)


def test_bert_per_layer_head_pruning_reloads_through_automodel(tmp_path):
    from transformers import AutoModel

    model = tiny_bert()
    prune(model, heads=1, ffn=40)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 3
    assert sorted(model.config.pruned_heads) == ["0", "1"] and all(len(h) == 1 for h in model.config.pruned_heads.values())
    expected = output(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(output(AutoModel.from_pretrained(tmp_path)), expected)


@pytest.mark.parametrize("stage, message", [
    ({"heads": 7}, "cannot remove 7 of 6"),
    ({"heads": 6}, "leaves none"),
    ({"ffn": 160}, "leaves none"),
    ({"layers": 2}, "keep at least one"),
    ({"heads": 6, "gqa": "per_group"}, "leaves none"),
])
def test_impossible_requests_are_clear_errors(stage, message):
    with pytest.raises(PruningError, match=message):
        prune(tiny_llama(), **stage)


def test_per_group_without_gqa_is_an_error():
    with pytest.raises(PruningError, match="gqa: groups"):
        prune(tiny_gpt2(), heads=1, gqa="per_group")


def test_hidden_pruning_the_config_cannot_describe_is_refused_before_cutting():
    model = tiny_gpt2()  # absolute position embeddings and head sizes derived from the hidden size
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruningError, match="hidden: 'gpt2'"):
        prune(model, hidden=0.25)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_blocks_without_attention_and_mlp_are_refused_with_the_reason():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300, state_size=4))
    with pytest.raises(PruningError, match="layer 0 of 'mamba'.*Mamba"):
        prune(model, heads=1)


@pytest.mark.parametrize("stage, message", [
    ({"heads": 1.0}, "all of them"),
    ({"ffn": -1}, ">= 0"),
    ({"heads": 1.5}, r"\[0, 1\)"),
    ({"importance": "random"}, "valid: activation, magnitude, taylor"),
    ({"gqa": "some"}, "valid: groups, per_group"),
    ({"head": 1}, "unknown key 'head'"),
    ({"overrides": [{"layers": [1]}]}, "give heads or ffn"),
    ({"overrides": [{"layers": [], "ffn": 0.5}]}, "name at least one decoder layer"),
    ({"overrides": [{"layers": [-1], "ffn": 0.5}]}, "negative index"),
    ({"overrides": [{"layers": [1], "ffn": 1.5}]}, r"\[0, 1\)"),
    ({"overrides": [{"layers": [1], "ffn": 0.5}], "uniform": False}, "one or the other"),
])
def test_bad_prune_recipes(stage, message):
    with pytest.raises(RecipeError, match=message):
        hfcompress.Recipe.from_dict({"stages": [{"prune": stage}]})


def test_remove_count_and_global_choice():
    assert remove_count(0.3334, 9, 3, "heads") == 3
    assert remove_count(0.25, 1536, 1, "ffn") == 384
    # Non-uniform: 3 removals on average over 2 layers, ranked across layers; a layer keeps one.
    removed = choose([[0.1, 0.2, 0.3, 5.0], [0.05, 9.0, 9.0, 9.0]], 2, uniform=False)
    assert removed == [{0, 1, 2}, {0}]
    assert choose([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], 1, uniform=False) == [set(), {0, 1}]
    assert choose([[0.1, 0.2, 0.3], [0.0, 0.0, 0.0]], 2, uniform=False) == [{0, 1}, {0, 1}]  # a layer keeps one
    units = head_units(LayerSizes(4, 2, 8), torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.zeros(2), "per_group")
    assert [u.heads for u in units] == [[1, 3], [0, 2]]  # slot 0: the weaker head of each group


def test_a_reloaded_non_uniform_model_quantizes_and_reloads_again(tmp_path):
    model = tiny_llama(num_hidden_layers=3, num_key_value_heads=6)
    prune(model, heads=3, ffn=0.5, uniform=False)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = type(model).from_pretrained(tmp_path / "pruned")
    hfcompress.compress(reloaded, {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
    expected = output(reloaded)
    reloaded.save_pretrained(tmp_path / "quantized")
    again = type(model).from_pretrained(tmp_path / "quantized")
    assert sizes(again) == sizes(model)
    assert torch.equal(output(again), expected)
