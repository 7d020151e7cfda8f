"""The model registry on tiny models of many families: blocks, roles, and cuts that match masks.

Cutting a head out of a block must compute exactly what the block computed with that head's
output silenced (its columns of the output projection zeroed), whatever the family's layout of
q/k/v; the same for an FFN channel. That checks every role the registry reads, fused row orders
included, against the model's own forward pass.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hfcompress.models import blocks_path, decoder_blocks, keep_inputs, linear_weight
from hfcompress.models.layout import block_layout, head_channels
from hfcompress.pruning import layout_of
from hfcompress.testing import tiny_model

# (family, expected q/k/v layout): separate projections, and every fused row order.
FAMILIES = [
    ("llama", "sep"), ("qwen3", "sep"), ("gemma3_text", "sep"), ("starcoder2", "sep"), ("granite", "sep"),
    ("phi3", "concat"), ("gpt2", "concat"), ("gpt_bigcode", "concat"), ("gpt_neox", "per_head"),
    ("persimmon", "per_head"), ("falcon", "concat"), ("opt", "sep"), ("gptj", "sep"), ("stablelm", "sep"),
    ("gpt_oss", "sep"),  # a MoE model: heads only; attention sinks are cut with their heads
]


def _ids(model, n=2, length=16):
    return torch.randint(3, min(400, model.config.get_text_config().vocab_size), (n, length),
                         generator=torch.Generator().manual_seed(1))


def _silence(block, layout, heads: list[int], channels: list[int]) -> None:
    """Zero the output projection's columns of ``heads`` and the FFN output's of ``channels``."""
    with torch.no_grad():
        out = linear_weight(block.get_submodule(layout.attention.out))
        out[:, head_channels(heads, layout.head_dim())] = 0
        if layout.mlp is not None and channels:
            linear_weight(block.get_submodule(layout.mlp.out))[:, torch.tensor(channels)] = 0


@pytest.mark.parametrize("family, order", FAMILIES)
def test_cutting_heads_and_channels_equals_silencing_them(family, order):
    model = tiny_model(family)
    layout = layout_of(model, mlp=family != "gpt_oss")
    assert (layout.attention.qkv_order if layout.attention.qkv else "sep") == order
    sizes = layout.sizes(decoder_blocks(model)[0])
    rep = sizes.heads // sizes.kv_heads
    # Remove the last key/value group with its query heads (or, without GQA, the last head).
    gone = list(range(sizes.heads - rep, sizes.heads))
    kv_gone = [sizes.kv_heads - 1] if sizes.kv_heads > 1 else []
    if not kv_gone and sizes.kv_heads == 1 and rep > 1:  # multi-query: one query head of the group
        gone = [sizes.heads - 1]
    channels = list(range(0, sizes.ffn, 4)) if layout.mlp is not None else []
    silenced = copy.deepcopy(model)
    for block in decoder_blocks(silenced):
        _silence(block, layout, gone, channels)
    ids = _ids(model)
    with torch.no_grad():
        expected = silenced(input_ids=ids).logits
    for block in decoder_blocks(silenced):
        layout.keep_heads(block, [h for h in range(sizes.heads) if h not in gone],
                          [j for j in range(sizes.kv_heads) if j not in kv_gone])
        if layout.mlp is not None:
            layout.keep_ffn(block, [c for c in range(sizes.ffn) if c not in channels])
    after = layout.sizes(decoder_blocks(silenced)[0])
    assert (after.heads, after.ffn) == (sizes.heads - len(gone), sizes.ffn - len(channels))
    with torch.no_grad():
        got = silenced(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("family, blocks", [
    ("llama", "model.layers"), ("gpt2", "transformer.h"), ("opt", "model.decoder.layers"),
    ("bloom", "transformer.h"), ("mpt", "transformer.blocks"), ("gpt_neox", "gpt_neox.layers"),
    ("gemma3", "model.language_model.layers"), ("jamba", "model.layers"), ("mixtral", "model.layers"),
])
def test_the_block_stack_is_found_from_the_module_tree(family, blocks):
    model = tiny_model(family)
    assert blocks_path(model) == blocks
    assert len(decoder_blocks(model)) == model.config.get_text_config().num_hidden_layers


def test_multi_head_latent_attention_and_mamba_blocks_are_not_read_as_attention():
    for family in ("deepseek_v3", "mamba"):
        model = tiny_model(family)
        assert block_layout(model, decoder_blocks(model)[0]) is None


def test_a_new_llama_like_family_needs_no_code():
    """A family transformers does not have and hfcompress has never heard of: detected, cut, quantized."""
    import hfcompress
    from transformers import LlamaConfig, LlamaForCausalLM

    class NovelConfig(LlamaConfig):
        model_type = "novel_family_for_test"

    class NovelForCausalLM(LlamaForCausalLM):
        config_class = NovelConfig

    torch.manual_seed(0)
    model = NovelForCausalLM(NovelConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300)).eval()
    ids = _ids(model, 4, 32)
    hfcompress.compress(model, {"stages": [{"prune": {"heads": 2, "ffn": 0.25}},
                                           {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]},
                        calibration_data=ids)
    assert model.config.num_attention_heads == 2 and model.config.intermediate_size == 72
    assert all(type(m).__name__ == "QuantLinear" for m in decoder_blocks(model)[0].self_attn.children()
               if hasattr(m, "in_features"))
