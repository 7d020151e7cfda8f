"""GPTQ's asymmetric calibration (against the float model's stream) and the least-squares scale refit."""

import copy

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.calibration import BlockInputs, input_hooks, run_block, walk_blocks
from hfcompress.models import decoder_blocks
from hfcompress.quantization.gptq import (accumulate_hessian, asymmetric_target, gptq_quantize, input_statistics,
                                          refit_scales, relative_error)
from hfcompress.quantization.gptq_runner import GPTQBlockQuantizer, InputTracker
from hfcompress.recipe import QuantizeStage, RecipeError

DATA = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def test_cross_product_is_the_running_mean_of_reference_times_input():
    torch.manual_seed(0)
    X, R = torch.randn(90, 8), torch.randn(90, 8)
    C, n = torch.zeros(8, 8), 0
    for x, r in zip(X.split(20), R.split(20)):
        C, n = accumulate_hessian(C, x, n, reference=r)
    assert torch.allclose(C, 2 / 90 * R.t() @ X, atol=1e-5)


def test_input_statistics_in_batches_and_in_bfloat16():
    """Batches of rows give the whole sample's Hessian and cross product; in bfloat16 the cross
    product's part from the float-quantized difference keeps its own precision, so C - H (what the
    asymmetric target is made of) stays accurate even where the difference is small next to H."""
    torch.manual_seed(3)
    X = torch.randn(5000, 48) @ torch.randn(48, 48)
    R = X + 1e-3 * torch.randn(5000, 48)  # the float model's inputs: close to the quantized ones
    H, n, C = input_statistics(X, reference=R, rows=700)
    assert n == 5000
    assert torch.allclose(H, 2 / n * X.t() @ X, rtol=1e-5, atol=1e-4)
    assert torch.allclose(C, 2 / n * R.t() @ X, rtol=1e-5, atol=1e-4)
    assert input_statistics(X)[2] is None
    pieces = input_statistics(X, reference=list(R.split([1000, 2500, 1500])), rows=700)  # window by window
    assert torch.allclose(pieces[0], H, rtol=1e-5, atol=1e-4) and torch.allclose(pieces[2], C, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="reference holds 4999 rows for 5000 inputs"):
        input_statistics(X, reference=R[1:])
    Hb, _, Cb = input_statistics(X, torch.bfloat16, reference=R, rows=700)
    D, Db = C - H, Cb - Hb
    assert (Hb - H).norm() < 2e-3 * H.norm()
    assert (Db - D).norm() < 2e-2 * D.norm()  # direct bf16 products of R and X would lose D entirely
    direct = (R.bfloat16().t() @ X.bfloat16()).float() * 2 / n - (X.bfloat16().t() @ X.bfloat16()).float() * 2 / n
    assert (direct - D).norm() > 0.5 * D.norm()


def test_asymmetric_target_solves_the_float_models_least_squares():
    torch.manual_seed(1)
    W, X = torch.randn(6, 16, dtype=torch.float64), torch.randn(500, 16, dtype=torch.float64)
    Xq = X + 0.1 * torch.randn(500, 16, dtype=torch.float64)  # what upstream rounding feeds the layer
    H = accumulate_hessian(torch.zeros(16, 16), Xq.float(), 0)[0]
    C = accumulate_hessian(torch.zeros(16, 16), Xq.float(), 0, reference=X.float())[0]
    target = asymmetric_target(W.float(), H, C, damp=1e-6).double()
    best = torch.linalg.lstsq(Xq, X @ W.t()).solution.t()  # argmin_V ||W X - V Xq||
    assert torch.allclose(target, best, atol=1e-3)
    assert (X @ W.t() - Xq @ target.t()).norm() < (X @ W.t() - Xq @ W.t()).norm()
    # Identical streams: the target is the weight itself (up to the ridge).
    H0 = accumulate_hessian(torch.zeros(16, 16), X.float(), 0)[0]
    assert torch.allclose(asymmetric_target(W.float(), H0, H0, damp=1e-6), W.float(), atol=1e-4)


def test_asymmetric_ridge_shrinks_the_correction_toward_the_weight_itself():
    torch.manual_seed(2)
    W, X = torch.randn(6, 16, dtype=torch.float64), torch.randn(500, 16, dtype=torch.float64)
    Xq = X + 0.1 * torch.randn(500, 16, dtype=torch.float64)
    H = accumulate_hessian(torch.zeros(16, 16), Xq.float(), 0)[0]
    C = accumulate_hessian(torch.zeros(16, 16), Xq.float(), 0, reference=X.float())[0]
    exact = asymmetric_target(W.float(), H, C, damp=1e-6)
    assert torch.allclose(asymmetric_target(W.float(), H, C, damp=0.5, ridge=1e-6), exact, atol=1e-4)
    for ridge in (0.1, 1.0):
        target = asymmetric_target(W.float(), H, C, damp=0.01, ridge=ridge).double()
        # The minimum of ||W X - V Xq||^2 / n + lam ||V - W||^2 (lam: ridge x H's mean diagonal,
        # H and C as accumulated, 2/n scaled): the gradient there vanishes.
        lam = ridge * H.double().diagonal().mean() / 2
        grad = -(X @ W.t() - Xq @ target.t()).t() @ Xq / 500 + lam * (target - W)
        assert grad.abs().max() < 1e-4
        assert (target - W).norm() < (exact.double() - W).norm()  # toward W itself, not toward zero
    far = asymmetric_target(W.float(), H, C, damp=0.01, ridge=1e4)
    assert torch.allclose(far, W.float(), atol=1e-3) and not torch.allclose(exact, W.float(), atol=1e-3)


@pytest.mark.parametrize("bits,act_order", [(3, False), (4, True), (2, True)])
def test_refit_keeps_the_codes_and_never_raises_the_output_error(bits, act_order):
    torch.manual_seed(bits)
    W = torch.randn(32, 160)
    X = torch.randn(2000, 40) @ torch.randn(40, 160) + 0.2 * torch.randn(2000, 160)
    H = accumulate_hessian(torch.zeros(160, 160), X, 0)[0]
    result = gptq_quantize(W, H, bits, 64, True, act_order=act_order, static_groups=act_order,
                           scale_dtype=torch.float32)
    refit = refit_scales(W, H, result.weight, torch.float32)
    assert torch.equal(refit.q, result.weight.q) and torch.equal(refit.zeros, result.weight.zeros)
    assert torch.equal(refit.g_idx, result.weight.g_idx) and (refit.scales > 0).all()
    before, after = result.error, relative_error(W, refit.dequantize(), H)
    assert after <= before * (1 + 1e-5)
    assert after < before * 0.995  # the scales GPTQ fixed before choosing the codes are not the optimum


def test_float_stream_pairs_token_for_token():
    """In the first block both streams hold the same hidden states and the block is still float, so
    every cross product equals its Hessian, and the float pass leaves the block's float outputs."""
    model = tiny_llama()
    stage = QuantizeStage.from_dict({"method": "gptq", "bits": 4, "group_size": 32, "asymmetric": 1})
    step = next(walk_blocks(model, DATA))
    block = step.block
    targets = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
    inputs = step.inputs
    reference = BlockInputs(inputs.hidden.clone(), inputs.kwargs, inputs.args)
    expected = BlockInputs(inputs.hidden.clone(), inputs.kwargs, inputs.args)
    run_block(block, expected, torch.device("cpu"), update=True)
    quantizer = GPTQBlockQuantizer(stage, torch.device("cpu"), reference=reference)
    tracker = InputTracker()
    quantizer._paired_pass(block, targets, inputs, tracker)
    assert set(tracker.cross) == set(tracker.hessians) == {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                            "mlp.down_proj"}
    for leader, H in tracker.hessians.items():  # cross holds C - H
        assert torch.allclose(tracker.cross[leader], torch.zeros_like(H), atol=1e-6), leader
    assert torch.allclose(reference.hidden, expected.hidden, atol=1e-6)
    assert not torch.allclose(reference.hidden, inputs.hidden, atol=1e-3)
    assert torch.equal(inputs.hidden, step.inputs.hidden)  # the quantized stream is the walk's to move


def test_asymmetric_refit_gptq_saves_and_reloads_like_plain_gptq(tmp_path):
    model = tiny_llama(num_hidden_layers=3)
    stage = {"method": "gptq", "bits": 3, "group_size": 32, "shrink": 0, "asymmetric": 1, "refit": True}
    quantized = hfcompress.compress(copy.deepcopy(model), {"stages": [{"quantize": stage}]}, calibration_data=DATA)
    plain = hfcompress.compress(copy.deepcopy(model), {"stages": [{"quantize": {**stage, "asymmetric": 0,
                                                                                  "refit": False}}]},
                                calibration_data=DATA)
    probe = DATA[:2]
    with torch.no_grad():
        assert not torch.equal(quantized(probe).logits, plain(probe).logits)  # the options change the result
        quantized.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(reloaded(probe).logits, quantized(probe).logits)
    assert decoder_blocks(reloaded)[2].mlp.down_proj.format.bits == 3


def test_recipe_checks_the_asymmetric_and_refit_keys():
    with pytest.raises(RecipeError, match=r"asymmetric: 2 must lie in \[0, 1\]"):
        QuantizeStage.from_dict({"method": "gptq", "asymmetric": 2})
    with pytest.raises(RecipeError, match="hessian_dtype: 'int8' is not a dtype"):
        QuantizeStage.from_dict({"method": "gptq", "hessian_dtype": "int8"})
    with pytest.raises(RecipeError, match="refit: applies to method gptq only"):
        QuantizeStage.from_dict({"method": "rtn", "refit": True})
    with pytest.raises(RecipeError, match="asymmetric_damp: sets asymmetric calibration's ridge; set asymmetric"):
        QuantizeStage.from_dict({"method": "gptq", "asymmetric_damp": 0.1})
    with pytest.raises(RecipeError, match=r"asymmetric_damp: -1 must lie in \(0, 100\]"):
        QuantizeStage.from_dict({"method": "gptq", "asymmetric": 0.5, "asymmetric_damp": -1})
    assert QuantizeStage.from_dict({"method": "gptq", "asymmetric": 0.5, "asymmetric_damp": 1}).asymmetric_damp == 1


def test_asymmetric_is_refused_for_weights_shared_across_blocks():
    recipe = {"stages": [{"share": {"every": 2, "parts": ["mlp"], "init": 0}},
                         {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "asymmetric": 1}}]}
    with pytest.raises(ValueError, match="asymmetric: calibration against the float model is not supported"):
        hfcompress.compress(tiny_llama(), recipe, calibration_data=DATA)


@pytest.mark.parametrize("asymmetric", [0, 0.25])
def test_true_sequential_solves_each_group_on_the_quantized_groups_before_it_in_one_pass(monkeypatch, asymmetric):
    """One batched call of the block: each group's Hessian is that of its inputs computed through the
    groups solved before it, its cross product pairs them with the float model's inputs, and the
    call's outputs are the quantized block's, ready for the next block."""
    cpu = torch.device("cpu")
    stage = QuantizeStage.from_dict({"method": "gptq", "bits": 3, "group_size": 32, "true_sequential": True,
                                     "asymmetric": asymmetric})
    step = next(walk_blocks(tiny_llama(), DATA))
    block, inputs = step.block, step.inputs
    float_block = copy.deepcopy(block)
    linears = lambda b: {name: m for name, m in b.named_modules() if isinstance(m, torch.nn.Linear)}  # noqa: E731
    original = BlockInputs(inputs.hidden.clone(), inputs.kwargs, inputs.args)
    reference = BlockInputs(inputs.hidden.clone(), inputs.kwargs, inputs.args) if asymmetric else None
    seen = {}
    solve = GPTQBlockQuantizer._quantize_group

    def spy(self, group, H, count, index, deferred, cross=None):
        seen[next(iter(group))] = (H.clone(), cross if cross is None else cross.clone())
        return solve(self, group, H, count, index, deferred, cross)

    monkeypatch.setattr(GPTQBlockQuantizer, "_quantize_group", spy)
    quantizer = GPTQBlockQuantizer(stage, cpu, reference=reference)
    quantizer.quantize_block(block, linears(block), inputs)
    assert list(seen) == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert torch.equal(inputs.hidden, original.hidden)  # the caller writes the outputs over them

    # Window by window through the block as quantized (a group's inputs depend on earlier groups
    # only), paired with the float block's inputs on the float stream (here the same hidden states).
    quantized, floats = InputTracker(), InputTracker()
    for i in range(len(original)):
        float_inputs = {}
        with input_hooks(linears(float_block), float_inputs.__setitem__):
            run_block(float_block, original.window(i), cpu)
        with input_hooks(linears(float_block), floats):
            run_block(float_block, original.window(i), cpu)
        quantized.reference = float_inputs
        with input_hooks(linears(block), quantized):
            run_block(block, original.window(i), cpu)
        quantized.release()
        floats.release()
    for leader, (H, cross) in seen.items():
        assert torch.allclose(H, quantized.hessians[leader], rtol=1e-4, atol=1e-6), leader
        if asymmetric:
            C = quantized.cross[leader] + quantized.hessians[leader]
            assert torch.allclose(cross, C, rtol=1e-4, atol=1e-6), leader
        else:
            assert cross is None
    # o_proj's inputs came through the quantized q/k/v, not the float ones.
    assert not torch.allclose(seen["self_attn.o_proj"][0], floats.hessians["self_attn.o_proj"], rtol=1e-3)
    expected = BlockInputs(original.hidden.clone(), inputs.kwargs, inputs.args)
    run_block(block, expected, cpu, update=True)
    assert torch.allclose(quantizer.block_outputs, expected.hidden, atol=1e-5)
    if asymmetric:  # the float stream moved on through the float block
        run_block(float_block, original, cpu, update=True)
        assert torch.allclose(reference.hidden, original.hidden, atol=1e-6)


def test_true_sequential_in_one_pass_matches_the_pass_per_group(monkeypatch):
    """Chained, the windows go through each block once, together; replayed, once per group and once
    more for the next block. Both quantize the same model, up to float summation order."""
    from hfcompress import calibration

    recipe = {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "true_sequential": True}}]}
    together = tiny_llama()
    hfcompress.compress(together, recipe, calibration_data=DATA)
    monkeypatch.setattr(calibration, "_chainable", lambda *args: False)
    per_group = tiny_llama()
    hfcompress.compress(per_group, recipe, calibration_data=DATA)
    codes = [(a.qweight == b.qweight).float().mean() for a, b in zip(
        (m for m in together.modules() if isinstance(m, hfcompress.QuantLinear)),
        (m for m in per_group.modules() if isinstance(m, hfcompress.QuantLinear)))]
    assert len(codes) == 7 * len(decoder_blocks(together))
    assert min(codes) > 0.97  # words of 8 codes: a flip from summation order shows here
    probe = DATA[:2]
    assert torch.allclose(together(probe).logits, per_group(probe).logits, atol=1e-3, rtol=1e-3)


def test_hessian_dtype_auto_takes_bfloat16_where_the_device_has_it(monkeypatch):
    from hfcompress.quantization import gptq_runner

    cpu = torch.device("cpu")
    stage = QuantizeStage.from_dict({"method": "gptq", "hessian_dtype": "auto"})
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(gptq_runner, "native_precision", lambda dtype, device, native=native: native)
        assert GPTQBlockQuantizer(stage, cpu).hessian_dtype == expected
        assert GPTQBlockQuantizer(stage, cpu, compute_dtype=torch.float32).hessian_dtype == (expected or torch.float32)
    explicit = QuantizeStage.from_dict({"method": "gptq", "hessian_dtype": "float16"})
    assert GPTQBlockQuantizer(explicit, cpu, compute_dtype=torch.bfloat16).hessian_dtype == torch.float16
