"""The rotate stage: Hadamard matrices, norms folded and the residual stream rotated with the
function kept, a plain checkpoint that vanilla transformers loads, and refusals."""

import copy
import json

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.recipe import RecipeError
from hfcompress.models import ArchitectureError
from hfcompress.rotation import hadamard, random_rotation

IDS = torch.arange(40).view(2, 20) * 7 % 300


def _with_norm_scales(model, seed=1):
    """Norm scales away from one (as trained models have them): folding them must matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("n", [2, 4, 12, 20, 24, 48, 96, 576, 896, 1536])
def test_hadamard_matrices_are_hadamard(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=H.dtype))


@pytest.mark.parametrize("n, method", [(96, "hadamard"), (36, "hadamard"), (50, "random")])
def test_rotations_are_orthogonal_and_seeded(n, method):
    Q = random_rotation(n, seed=3, method=method)
    assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=Q.dtype), atol=1e-12)
    assert torch.equal(Q, random_rotation(n, seed=3, method=method))
    assert not torch.equal(Q, random_rotation(n, seed=4, method=method))
    with pytest.raises(ValueError, match="no Hadamard matrix of order 36"):
        hadamard(36)


@pytest.mark.parametrize("tie", [True, False])
def test_rotated_model_computes_the_same_logits_and_saves_a_plain_checkpoint(tmp_path, tie):
    model = _with_norm_scales(tiny_llama(tie=tie))
    before = _logits(model)
    hfcompress.compress(model, {"stages": [{"rotate": {"seed": 5}}]})
    after = _logits(model)
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight,
                              tiny_llama(tie=tie).model.layers[0].self_attn.q_proj.weight)
    # The norms' scales went into the linears after them.
    assert all(torch.all(m.weight == 1) for n, m in model.named_modules() if n.endswith("norm"))
    # The final norm's scale is not uniform: lm_head = E diag(gamma) Q is not E Q, so it is untied.
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())  # nothing of ours
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(_logits(reloaded), before, atol=1e-4, rtol=1e-4)


def test_tied_embeddings_stay_tied_when_the_final_norm_is_uniform(tmp_path):
    model = _with_norm_scales(tiny_llama(tie=True))
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    before = _logits(model)
    hfcompress.compress(model, {"stages": [{"rotate": {}}]})
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the same rotation on both uses
    assert torch.allclose(_logits(model), before, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.allclose(_logits(reloaded), before, atol=1e-4, rtol=1e-4)


def test_rotation_spreads_an_outlier_channel():
    """One residual channel 30x larger than the rest (what LLM activations and the weights that read
    them show) leaves the readers with an outlier column; after the rotation it is spread out."""
    model = tiny_llama(tie=False)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] = 30.0

    def outlier_ratio(m):
        layer = m.model.layers[0]
        W = (layer.self_attn.q_proj.weight * layer.input_layernorm.weight).detach()
        return float(W.abs().max() / W.pow(2).mean().sqrt())

    before = outlier_ratio(model)
    hfcompress.compress(model, {"stages": [{"rotate": {}}]})
    assert outlier_ratio(model) < before / 4


def test_rotate_then_quantize_in_one_recipe_reloads_and_beats_rounding_alone(tmp_path):
    float_model = _with_norm_scales(tiny_llama(tie=False))
    with torch.no_grad():  # outlier input channels in the weights that read the stream: what rotating is for
        for name, module in float_model.named_modules():
            if name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                module.weight[:, [3, 50]] *= 20
    reference = _logits(float_model)
    quantize = {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}
    plain = hfcompress.compress(copy.deepcopy(float_model), {"stages": [quantize]})
    rotated = hfcompress.compress(copy.deepcopy(float_model), {"stages": [{"rotate": {}}, quantize]})
    error = {name: float((_logits(m) - reference).pow(2).mean()) for name, m in (("plain", plain), ("rotated", rotated))}
    assert error["rotated"] < error["plain"] / 2, error
    rotated.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), _logits(rotated))
    assert [s.name for s in hfcompress.compression_record(reloaded).recipe.stages] == ["rotate", "quantize"]


def test_layernorm_models_are_refused_and_left_as_they_were():
    model = tiny_gpt2()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ArchitectureError, match="LayerNorm subtracts the mean"):
        hfcompress.compress(model, {"stages": [{"rotate": {}}]})
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_family_whose_stream_the_rotation_does_not_keep_is_caught_by_the_logit_check():
    """Gemma 2 normalizes the attention output before adding it to the stream (a post-norm): with
    its scale away from one the rotated model computes something else, which the check refuses."""
    from hfcompress.testing.tiny import tiny_model

    model = _with_norm_scales(tiny_model("gemma2").float().eval())
    before = _logits(model, IDS % model.config.vocab_size)
    with pytest.raises(ArchitectureError, match="computes different logits"):
        hfcompress.compress(model, {"stages": [{"rotate": {}}]})
    assert torch.equal(_logits(model, IDS % model.config.vocab_size), before)


def test_recipe_refuses_misplaced_or_unknown_rotations():
    with pytest.raises(RecipeError, match="rotate after quantize"):
        hfcompress.Recipe.from_dict({"stages": [{"quantize": {"bits": 4}}, {"rotate": {}}]})
    with pytest.raises(RecipeError, match="method: 'walsh' is not a rotation; valid: hadamard, random"):
        hfcompress.Recipe.from_dict({"stages": [{"rotate": {"method": "walsh"}}]})
