"""peft on packed layers: LoRA/DoRA adapters train, save, reload onto the compressed base, merge."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

import hfcompress
from hfcompress.distillation import PackedBlocks

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 300, (32 * 32,), generator=torch.Generator().manual_seed(0))
X = IDS[:64].view(2, 32)
QUANTIZE = {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    hfcompress.compress(tiny_llama(), QUANTIZE).save_pretrained(folder)
    return folder


def logits(model):
    with torch.no_grad():
        return model(X).logits


def test_all_linear_finds_the_packed_layers_that_float_ones_would_be(base_dir):
    float_names = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules="all-linear")).targeted_module_names
    packed = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                 peft.LoraConfig(target_modules="all-linear"))
    assert sorted(packed.targeted_module_names) == sorted(float_names) and "lm_head" not in float_names
    layer = packed.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "PackedLoraLinear" and isinstance(layer.base_layer, hfcompress.QuantLinear)


def test_qlora_trains_saves_a_standard_adapter_and_reloads_onto_the_compressed_base(base_dir, tmp_path):
    model = peft.prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(base_dir),
                                                 use_gradient_checkpointing=True)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    packed_before = {k: v.clone() for k, v in model.named_buffers() if k.endswith("qweight")}
    blocks = PackedBlocks(IDS[: 4 * 32], 32)  # one batch, every step: the loss on it must fall
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=15, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model, args, train_dataset=blocks, data_collator=default_data_collator)  # accepted
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in packed_before.items())  # frozen
    model.eval()
    trained = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), trained)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unload_gives_a_float_model_that_saves_plain(base_dir, tmp_path, dora):
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora))
    out = model(input_ids=X, labels=X)
    out.loss.backward()
    with torch.no_grad():  # a trained-looking adapter: nonzero B
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    adapted = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, hfcompress.QuantLinear) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), adapted,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["import peft, hfcompress",
                                   "import hfcompress, importlib.util; importlib.util.find_spec('peft'); import peft"])
def test_peft_is_taught_whichever_is_imported_first(order):
    import subprocess
    import sys

    check = "from hfcompress.integration import peft as p; assert p._PATCHED, 'peft was not patched'"
    subprocess.run([sys.executable, "-c", f"{order}; {check}"], check=True, timeout=120)
