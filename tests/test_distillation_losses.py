"""Distillation losses against values computed by hand on tiny tensors."""

import math

import pytest
import torch

from hfcompress.distillation import attention_kl, hidden_mse, logit_divergence


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(x):
    e = [math.exp(v) for v in x]
    return [v / sum(e) for v in e]


S, T = [1.0, 0.0, -1.0], [0.0, 2.0, 0.5]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_reverse_and_jsd_match_hand_computation(temperature):
    ps = softmax([v / temperature for v in S])
    pt = softmax([v / temperature for v in T])
    m = [(a + b) / 2 for a, b in zip(ps, pt)]
    s, t = torch.tensor([[S]]), torch.tensor([[T]])
    scale = temperature**2
    assert float(logit_divergence(s, t, temperature, "forward")) == pytest.approx(scale * kl(pt, ps), rel=1e-5)
    assert float(logit_divergence(s, t, temperature, "reverse")) == pytest.approx(scale * kl(ps, pt), rel=1e-5)
    jsd = 0.5 * kl(pt, m) + 0.5 * kl(ps, m)
    assert float(logit_divergence(s, t, temperature, "jsd")) == pytest.approx(scale * jsd, rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_is_trls_gkd_loss(beta):
    # TRL's GKDTrainer: m = beta p_t + (1 - beta) p_s, loss = beta KL(p_t || m) + (1 - beta) KL(p_s || m),
    # with forward KL at beta = 0 and reverse KL at beta = 1.
    ps, pt = softmax(S), softmax(T)
    if beta == 0:
        expected = kl(pt, ps)
    elif beta == 1:
        expected = kl(ps, pt)
    else:
        m = [beta * b + (1 - beta) * a for a, b in zip(ps, pt)]
        expected = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    got = float(logit_divergence(torch.tensor([[S]]), torch.tensor([[T]]), 1.0, "jsd", beta=beta))
    assert got == pytest.approx(expected, rel=1e-5)


def test_mask_averages_only_counted_tokens():
    s = torch.tensor([[S, S]])
    t = torch.tensor([[T, S]])  # the second token agrees: divergence 0
    full = float(logit_divergence(s, t))
    masked = float(logit_divergence(s, t, mask=torch.tensor([[1, 0]])))
    assert masked == pytest.approx(kl(softmax(T), softmax(S)), rel=1e-5)
    assert full == pytest.approx(masked / 2, rel=1e-5)


def test_hidden_mse_with_projection_and_layer_map():
    student = [torch.zeros(1, 2, 3), torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])]
    teacher = [torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])]
    projection = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # keep the first two features
    loss = hidden_mse(student, teacher, {1: 2}, torch.nn.ModuleDict({"1": projection}))
    # token 0: (1-1)^2 + (2-1)^2 = 1 -> mean 0.5; token 1: (0-2)^2 + 0 = 4 -> mean 2; tokens: 1.25
    assert float(loss.detach()) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="give a projection"):
        hidden_mse(student, teacher, {1: 2})


def test_attention_kl_averages_heads():
    teacher = [torch.tensor([[[[0.5, 0.5]], [[0.5, 0.5]]]])]  # [1, 2 heads, 1 query, 2 keys]
    student = [torch.tensor([[[[0.9, 0.1]]]])]  # one head
    expected = kl([0.5, 0.5], [0.9, 0.1])
    assert float(attention_kl(student, teacher, {0: 0})) == pytest.approx(expected, rel=1e-5)


def test_divergences_are_zero_when_equal_and_unknown_kinds_fail():
    x = torch.randn(2, 3, 7)
    for kind in ("forward", "reverse", "jsd"):
        assert float(logit_divergence(x, x, 2.0, kind)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="valid: forward, reverse, jsd"):
        logit_divergence(x, x, kind="kl")
