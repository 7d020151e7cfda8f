"""Compute precision: ``auto`` picks float32 where bfloat16 is emulated, and float32 compute of a
bfloat16 model gives exactly what its float32 copy gives, without changing what it stores."""

import copy

import pytest
import torch

import hfcompress
from hfcompress import precision
from hfcompress.evaluation import evaluate_perplexity
from hfcompress.precision import float32_block, resolve_compute_dtype
from hfcompress.quantization.qlinear import QuantLinear

from conftest import tiny_llama

CPU = torch.device("cpu")
WINDOWS = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def emulated_bf16(monkeypatch, emulated: bool = True):
    monkeypatch.setattr(precision, "native_precision", lambda dtype, device: not emulated or dtype == torch.float32)


def test_auto_is_the_model_dtype_where_native_else_float32(monkeypatch):
    emulated_bf16(monkeypatch)
    assert resolve_compute_dtype("auto", torch.bfloat16, CPU) == torch.float32
    assert resolve_compute_dtype("auto", torch.float32, CPU) is None  # None: the model's own
    assert resolve_compute_dtype(None, torch.bfloat16, CPU) is None
    assert resolve_compute_dtype("bfloat16", torch.float32, CPU) == torch.bfloat16
    emulated_bf16(monkeypatch, emulated=False)
    assert resolve_compute_dtype("auto", torch.bfloat16, CPU) is None
    assert resolve_compute_dtype("float32", torch.bfloat16, CPU) == torch.float32


def test_float32_block_restores_what_it_raised_by_name_and_keeps_new_tensors():
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    block[1].register_buffer("table", torch.ones(3))  # float32 by design: left alone
    with float32_block(block):
        assert {p.dtype for p in block.parameters()} == {torch.float32}
        block[0] = torch.nn.Linear(4, 4)  # replaced inside, as a stage replaces a layer
        block[0].register_buffer("scales", torch.ones(4, dtype=torch.float16))  # a name of its own
        block[1].weight.data.fill_(0.5)
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}  # same names, same dtypes as before
    assert block[0].scales.dtype == torch.float16 and block[1].table.dtype == torch.float32
    assert torch.all(block[1].weight == 0.5)


def test_float32_evaluation_of_a_bf16_model_equals_its_float32_copy(monkeypatch):
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 300, (600,), generator=torch.Generator().manual_seed(3))
    copy32 = copy.deepcopy(model).float()
    expected = evaluate_perplexity(copy32, None, ids, seq_len=128, progress=False)
    emulated_bf16(monkeypatch)
    auto = evaluate_perplexity(model, None, ids, seq_len=128, progress=False)
    assert auto.dtype == "float32" and auto.nll == expected.nll
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # stored as it was
    emulated_bf16(monkeypatch, emulated=False)
    own = evaluate_perplexity(model, None, ids, seq_len=128, progress=False)
    assert own.dtype == "bfloat16" and own.nll != expected.nll


def gptq_recipe(dtype):
    return {"calibration": {"compute_dtype": dtype},
            "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
                                     "static_groups": True}}]}


def q_proj_input_dtypes(model):
    seen = set()
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype))
    return seen


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_gptq_of_a_bf16_model_computed_in_float32_equals_its_float32_copy(monkeypatch, dtype):
    emulated_bf16(monkeypatch)
    model = tiny_llama().to(torch.bfloat16)
    copy32 = copy.deepcopy(model).float()
    seen = q_proj_input_dtypes(model)
    hfcompress.compress(model, gptq_recipe(dtype), calibration_data=WINDOWS)
    hfcompress.compress(copy32, gptq_recipe(None), calibration_data=WINDOWS)
    assert seen == {torch.float32}
    ours = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in copy32.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, module in ours.items():
        for key in ("qweight", "qzeros", "scales"):
            assert torch.equal(getattr(module, key), getattr(theirs[name], key)), (name, key)
        assert module.scales.dtype == torch.float16
    floats = {p.dtype for n, p in model.named_parameters()}
    assert floats == {torch.bfloat16}  # norms and embeddings stored as they were
    model(WINDOWS[:1])


def test_gptq_in_the_model_dtype_when_asked(monkeypatch):
    emulated_bf16(monkeypatch)
    model = tiny_llama().to(torch.bfloat16)
    seen = q_proj_input_dtypes(model)
    hfcompress.compress(model, gptq_recipe(None), calibration_data=WINDOWS)
    assert seen == {torch.bfloat16}
