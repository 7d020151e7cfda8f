"""Weight sharing on tiny models: tied embeddings, cross-layer groups of every family, relaxed
sharing, storage once, reload re-ties, GPTQ of shared weights, exports and the errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import model_output, scrambled, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.distillation.trainer import DistillationTrainer
from hfcompress.formats.checkpoint import read_tensor_shapes
from hfcompress.export import ExportError, export_model
from hfcompress.models import decoder_blocks
from hfcompress.quantization import dispatch
from hfcompress.quantization.gptq_runner import SharedHessians
from hfcompress.recipe import RecipeError
from hfcompress.report import summarize_folder, tensor_nbytes
from hfcompress.sharing import SharedLinearDelta, SharingError

WINDOWS = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))


FAMILIES = {"llama": lambda: tiny_llama(num_hidden_layers=4), "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}
PATHS = {"llama": ("self_attn.q_proj", "mlp.down_proj"), "gpt2": ("attn.c_attn", "mlp.c_fc"),
         "opt": ("self_attn.out_proj", "fc1"), "bert": ("attention.self.key", "output.dense")}


def output(model, ids=WINDOWS[:2, :24]):
    return model_output(model, ids)


def share(model, **stage):
    return hfcompress.compress(model, {"stages": [{"share": stage}]}, calibration_data=WINDOWS)


def tensor_bytes(folder) -> dict[str, int]:
    return tensor_nbytes(folder.glob("*.safetensors"))


def file_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# --- cross-layer sharing ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("parts", [["attention"], ["mlp"], ["attention", "mlp"]])
def test_every_family_shares_stores_once_and_reloads_tied(tmp_path, family, parts):
    model = FAMILIES[family]()
    model.save_pretrained(tmp_path / "plain")
    share(model, every=2, parts=parts)
    blocks = decoder_blocks(model)
    attention, mlp = PATHS[family]
    for path in ([attention] if "attention" in parts else []) + ([mlp] if "mlp" in parts else []):
        assert blocks[1].get_submodule(path) is blocks[0].get_submodule(path)
    if parts == ["attention"]:
        assert blocks[1].get_submodule(mlp) is not blocks[0].get_submodule(mlp)
    expected = output(model)
    model.save_pretrained(tmp_path / "shared")

    # The file lacks exactly the users' copies: every removed byte is a duplicate's.
    before, after = tensor_bytes(tmp_path / "plain"), tensor_bytes(tmp_path / "shared")
    removed = set(before) - set(after)
    users = json.loads((tmp_path / "shared" / "config.json").read_text())["quantization_config"]["shared"]["modules"]
    assert removed and all(any(key.startswith(user + ".") for user in users) for key in removed)
    duplicate_bytes = sum(before[key] for key in removed)
    assert sum(before.values()) - sum(after.values()) == duplicate_bytes
    assert 0 <= (file_bytes(tmp_path / "plain") - file_bytes(tmp_path / "shared")) - duplicate_bytes < 4096  # headers

    reloaded = type(model).from_pretrained(tmp_path / "shared")
    assert torch.equal(output(reloaded), expected)
    again = decoder_blocks(reloaded)
    for path in ([attention] if "attention" in parts else []) + ([mlp] if "mlp" in parts else []):
        assert again[1].get_submodule(path) is again[0].get_submodule(path)
        assert again[1].get_submodule(path).weight is again[0].get_submodule(path).weight


def test_mean_and_member_initialization():
    model = tiny_llama(num_hidden_layers=4)
    w = [model.model.layers[i].mlp.up_proj.weight.detach().clone() for i in range(4)]
    share(model, layers=[[0, 1], [2, 3]], parts=["mlp"])
    assert torch.allclose(model.model.layers[1].mlp.up_proj.weight, (w[0] + w[1]) / 2)
    assert torch.allclose(model.model.layers[3].mlp.up_proj.weight, (w[2] + w[3]) / 2)

    model = tiny_llama(num_hidden_layers=4)
    share(model, layers=[[0, 2]], parts=["mlp"], init=1)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w[2])
    assert model.model.layers[1].mlp.up_proj is not model.model.layers[0].mlp.up_proj


def test_sharing_counts_parameters_once_for_training():
    model = tiny_llama(num_hidden_layers=4)
    before = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    share(model, every=2, parts=["mlp"])
    assert sum(p.numel() for p in model.parameters()) == before - 2 * mlp
    out = model(input_ids=WINDOWS[:1], labels=WINDOWS[:1])
    out.loss.backward()
    grad = model.model.layers[0].mlp.up_proj.weight.grad
    assert grad is not None and grad is model.model.layers[1].mlp.up_proj.weight.grad


def test_relaxed_sharing_starts_equal_trains_its_deltas_and_reloads(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    share(model, every=2, parts=["mlp"], init=0)
    strict = output(model)
    model = tiny_llama(num_hidden_layers=4)
    share(model, every=2, parts=["mlp"], init=0, lora_rank=4)
    wrapper = model.model.layers[1].mlp.up_proj
    assert isinstance(wrapper, SharedLinearDelta) and wrapper.base is model.model.layers[0].mlp.up_proj.base
    assert torch.equal(output(model), strict)  # B starts at zero
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.up_proj.lora_B.normal_(std=0.02, generator=torch.Generator().manual_seed(i))
    expected = output(model)
    assert not torch.equal(expected, strict)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(output(reloaded), expected)
    assert reloaded.model.layers[1].mlp.up_proj.base is reloaded.model.layers[0].mlp.up_proj.base
    assert not torch.equal(reloaded.model.layers[1].mlp.up_proj.lora_B, reloaded.model.layers[0].mlp.up_proj.lora_B)
    keys = set(read_tensor_shapes(tmp_path.glob("*.safetensors")))
    assert "model.layers.1.mlp.up_proj.lora_B" in keys and "model.layers.1.mlp.up_proj.base.weight" not in keys


def test_a_reloaded_shared_model_quantizes_and_reloads_shared_again(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    share(model, every=2, parts=["attention"])
    model.save_pretrained(tmp_path / "shared")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "shared")
    hfcompress.compress(reloaded, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]})
    assert reloaded.config.quantization_config.shared == model.config.quantization_config.shared
    expected = output(reloaded)
    reloaded.save_pretrained(tmp_path / "quantized")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")
    assert torch.equal(output(again), expected)
    assert again.model.layers[3].self_attn.o_proj is again.model.layers[2].self_attn.o_proj


def test_distillation_of_a_shared_student_resumes_exactly(tmp_path, monkeypatch):
    import transformers.trainer

    from hfcompress.distillation import DistillationTrainingArguments, PackedBlocks

    teacher = tiny_llama(num_hidden_layers=4)
    student = share(tiny_llama(num_hidden_layers=4), every=2, parts=["mlp"], lora_rank=2)
    blocks = PackedBlocks(torch.randint(0, 300, (32 * 32,), generator=torch.Generator().manual_seed(0)), 32)

    def trainer(model, folder, **overrides):
        options = dict(output_dir=str(tmp_path / folder), max_steps=4, per_device_train_batch_size=4,
                       learning_rate=3e-3, lr_scheduler_type="constant", save_strategy="no", report_to=[], seed=0,
                       use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
        args = DistillationTrainingArguments(**{**options, **overrides})
        return DistillationTrainer(model, args, teacher_model=teacher, train_dataset=blocks)

    straight = trainer(copy.deepcopy(student), "a")
    straight.train()
    trainer(copy.deepcopy(student), "b", max_steps=2, save_strategy="steps", save_steps=2).train()
    resumed = trainer(scrambled(copy.deepcopy(student)), "b")  # equal at the end only if the checkpoint loaded
    warnings = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warnings.append(message))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    # Aliases of tensors the checkpoint stores once (layer 1's MLP base, the tied lm_head) are not "missing".
    assert not [message for message in warnings if "missing keys" in message], warnings
    keys = set(read_tensor_shapes((tmp_path / "b" / "checkpoint-2").glob("*.safetensors")))
    assert "model.layers.1.mlp.up_proj.base.weight" not in keys and "model.layers.1.mlp.up_proj.lora_A" in keys
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    layers = resumed.model.model.layers
    assert layers[1].mlp.up_proj.base is layers[0].mlp.up_proj.base


# --- quantization of shared weights --------------------------------------------------------------


def test_shared_hessians_accumulate_over_users_until_the_last():
    module = torch.nn.Linear(3, 3)
    hessians = SharedHessians({id(module): [(0, "mlp.up_proj"), (2, "mlp.up_proj")]})
    H0, H2 = torch.eye(3), 4 * torch.eye(3)
    assert hessians.add(module, H0, 10, block=0) is None
    assert torch.allclose(hessians.add(module, H2, 30, block=2), (10 * H0 + 30 * H2) / 40)
    assert not hessians.pending


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_a_shared_weight_is_quantized_once_and_reloads_shared(tmp_path, method, monkeypatch):
    from hfcompress.quantization import gptq_runner

    solved = []
    original = gptq_runner.gptq_quantize
    monkeypatch.setattr(gptq_runner, "gptq_quantize", lambda W, H, *a, **k: solved.append(W.shape) or original(W, H, *a, **k))
    model = tiny_llama(num_hidden_layers=4)
    recipe = {"stages": [{"share": {"every": 2, "parts": ["mlp"]}},
                         {"quantize": {"method": method, "bits": 4, "group_size": 32}}]}
    hfcompress.compress(model, recipe, calibration_data=WINDOWS)
    layers = model.model.layers
    assert type(layers[1].mlp.down_proj).__name__ == "QuantLinear" and layers[1].mlp.down_proj is layers[0].mlp.down_proj
    modules = model.config.quantization_config.modules
    assert "model.layers.0.mlp.down_proj" in modules and "model.layers.1.mlp.down_proj" not in modules
    if method == "gptq":
        # Per block: q/k/v, o, then gate/up and down once per group (at its second layer) -> 4 x 2 + 2 x 2.
        assert len(solved) == 4 * 2 + 2 * 2
    expected = output(model)
    model.save_pretrained(tmp_path)
    keys = set(read_tensor_shapes(tmp_path.glob("*.safetensors")))
    assert "model.layers.0.mlp.down_proj.qweight" in keys and "model.layers.1.mlp.down_proj.qweight" not in keys
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(output(reloaded), expected)
    assert reloaded.model.layers[1].mlp.down_proj is reloaded.model.layers[0].mlp.down_proj


def test_gptq_of_a_shared_weight_uses_every_users_inputs(monkeypatch):
    """The Hessian a shared weight is solved with is the mean over both layers' inputs."""
    from hfcompress.quantization import gptq_runner

    seen = []
    original = gptq_runner.gptq_quantize

    def spy(W, H, *args, **kwargs):
        seen.append(H.clone())
        return original(W, H, *args, **kwargs)

    monkeypatch.setattr(gptq_runner, "gptq_quantize", spy)
    model = tiny_llama(num_hidden_layers=2)
    # Layers 0 and 1 share everything, so nothing is quantized before both have run in float and
    # the expected Hessian is that of a float forward pass.
    share(model, layers=[[0, 1]], parts=["attention", "mlp"], init=0)
    down = model.model.layers[0].mlp.down_proj
    inputs = []
    hook = down.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().reshape(-1, 160)))
    with torch.no_grad():
        model(input_ids=WINDOWS)
    hook.remove()
    X = torch.cat(inputs).double()
    expected = 2 * X.t() @ X / X.shape[0]
    hfcompress.compress(model, {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]},
                        calibration_data=WINDOWS)
    (H,) = [h for h in seen if h.shape == (160, 160)]  # down_proj, solved once
    assert torch.allclose(H.double(), expected, rtol=1e-4, atol=1e-5)
    assert len(inputs) == 2 and model.model.layers[1].mlp.down_proj is model.model.layers[0].mlp.down_proj


def test_shared_model_exports_every_layers_copy(tmp_path):
    model = tiny_llama(num_hidden_layers=4, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    recipe = {"stages": [{"share": {"every": 2, "parts": ["mlp"]}},
                         {"quantize": {"method": "gptq", "bits": 4, "group_size": 64}}]}
    hfcompress.compress(model, recipe, calibration_data=WINDOWS)
    model.save_pretrained(tmp_path / "native")
    out = export_model(tmp_path / "native", "compressed-tensors", tmp_path / "ct")
    reader = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad(), dispatch.use("reference"):
        assert torch.equal(reader(WINDOWS[:2]).logits, model(WINDOWS[:2]).logits)
    gptq = export_model(tmp_path / "native", "gptq", tmp_path / "gptq")
    keys = set(read_tensor_shapes(gptq.glob("*.safetensors")))
    assert {"model.layers.1.mlp.up_proj.qweight", "model.layers.3.mlp.down_proj.g_idx"} <= keys


def test_relaxed_sharing_refuses_export(tmp_path):
    model = tiny_llama(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    recipe = {"stages": [{"share": {"every": 2, "parts": ["mlp"], "lora_rank": 2}},
                         {"quantize": {"method": "rtn", "bits": 4, "group_size": 64}}]}
    hfcompress.compress(model, recipe)
    model.save_pretrained(tmp_path / "native")
    with pytest.raises(ExportError, match="lora_rank"):
        export_model(tmp_path / "native", "gptq", tmp_path / "gptq")


# --- tied embeddings -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["input", "output", "mean"])
def test_tie_embeddings_modes_save_once_and_reload_as_a_plain_checkpoint(tmp_path, mode):
    model = tiny_llama(tie=False)
    embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()
    share(model, tie_embeddings=mode)
    expected_matrix = {"input": embed, "output": head, "mean": (embed + head) / 2}[mode]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.allclose(model.lm_head.weight, expected_matrix)
    expected = output(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert "lm_head.weight" not in read_tensor_shapes(tmp_path.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(output(reloaded), expected)


def test_tied_embeddings_heal_by_distillation_from_the_untied_model(tmp_path, monkeypatch):
    model = tiny_llama(tie=False)
    untied = copy.deepcopy(model)
    teachers = []
    original_init = DistillationTrainer.__init__

    def spy(self, *args, teacher_model=None, **kwargs):
        teachers.append(teacher_model)
        original_init(self, *args, teacher_model=teacher_model, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "__init__", spy)
    recipe = {"stages": [{"share": {"tie_embeddings": "mean"}},
                         {"distill": {"steps": 3, "seq_len": 16, "batch_size": 2, "lr": 1e-2}}]}
    hfcompress.compress(model, recipe, calibration_data=WINDOWS)
    # The distill stage learned from the model as it entered the recipe: untied, its two matrices unchanged.
    (teacher,) = teachers
    assert teacher.lm_head.weight is not teacher.model.embed_tokens.weight
    assert torch.equal(teacher.lm_head.weight, untied.lm_head.weight)
    assert torch.equal(teacher.model.embed_tokens.weight, untied.model.embed_tokens.weight)
    # One matrix, trained away from its tied start with the gradients of both uses.
    tied = (untied.model.embed_tokens.weight + untied.lm_head.weight) / 2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not torch.allclose(model.lm_head.weight, tied)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in read_tensor_shapes(tmp_path.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(output(reloaded), output(model))


def test_tied_model_keeps_its_tie_through_prune_distill_gptq_save_reload_and_export(tmp_path):
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    recipe = {"stages": [{"prune": {"hidden": 0.25, "ffn": 0.25}},
                         {"distill": {"steps": 2, "seq_len": 16, "batch_size": 2}},
                         {"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]}
    hfcompress.compress(model, recipe, calibration_data=WINDOWS)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path / "native")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert torch.equal(output(reloaded), output(model))
    for fmt in ("compressed-tensors", "gptq"):
        out = export_model(tmp_path / "native", fmt, tmp_path / fmt)
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is True
        keys = read_tensor_shapes(out.glob("*.safetensors"))
        assert "lm_head.weight" not in keys and keys["model.embed_tokens.weight"] == (300, 96)
    reader = AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors")
    assert reader.lm_head.weight is reader.model.embed_tokens.weight
    with torch.no_grad(), dispatch.use("reference"):
        assert torch.equal(reader(WINDOWS[:2]).logits, model(WINDOWS[:2]).logits)


def test_inspect_reports_unique_and_total_parameters(tmp_path):
    model = tiny_llama(num_hidden_layers=4)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once by torch
    embedding = model.model.embed_tokens.weight.numel()
    share(model, every=2, parts=["mlp"])
    unique = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    summary = summarize_folder(tmp_path)
    assert summary["unique_params"] == unique
    assert summary["total_params"] == total + embedding  # every use: the MLPs of all four layers, lm_head


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage, message", [
    ({"layers": [[0, 1], [1, 2]]}, "layer 1 appears in groups 0 and 1"),
    ({"layers": [[0, 0]]}, "twice in the same group"),
    ({"layers": [[3]]}, "fewer than two layers"),
    ({"layers": [[-1, 0]]}, "not a layer index"),
    ({"every": 1}, "2 or more"),
    ({"layers": [[0, 1]], "every": 2}, "not both"),
    ({"every": 2, "parts": ["mlp", "norm"]}, "parts"),
    ({"every": 2, "parts": []}, "parts"),
    ({"every": 2, "init": "median"}, "init"),
    ({"tie_embeddings": "both"}, "tie_embeddings"),
    ({}, "nothing to share"),
    ({"every": 2, "lora_rank": -1}, "lora_rank"),
])
def test_invalid_share_recipes(stage, message):
    with pytest.raises(RecipeError, match=message):
        share(tiny_llama(), **stage)


def test_layers_that_do_not_exist_are_named():
    with pytest.raises(SharingError, match=r"layer 4 does not exist; the model has 4 decoder layers \(0 to 3\)"):
        share(tiny_llama(num_hidden_layers=4), layers=[[2, 4]])
    with pytest.raises(SharingError, match="position 2 does not exist"):
        share(tiny_llama(num_hidden_layers=4), layers=[[0, 1]], init=2)


def test_mismatched_shapes_are_refused():
    model = tiny_llama(num_hidden_layers=2)
    hfcompress.compress(model, {"stages": [{"prune": {"ffn": 0.5, "uniform": False}}]}, calibration_data=WINDOWS)
    assert model.model.layers[0].mlp.up_proj.out_features != model.model.layers[1].mlp.up_proj.out_features
    with pytest.raises(SharingError, match="differs in shape across group"):
        share(model, every=2, parts=["mlp"])


def test_stage_order_errors():
    with pytest.raises(RecipeError, match=r"share after quantize; quantize comes once, followed only by distill"):
        hfcompress.compress(tiny_llama(), {"stages": [{"quantize": {"bits": 4, "group_size": 32}}, {"share": {"every": 2}}]})
    with pytest.raises(RecipeError, match="put the prune stage before share"):  # before sharing ran
        hfcompress.compress(tiny_llama(), {"stages": [{"share": {"every": 2}}, {"prune": {"ffn": 0.25}}]})
    with pytest.raises(SharingError, match="no output embeddings"):
        share(tiny_bert(), tie_embeddings="input")


def test_blocks_without_attention_and_mlp_are_refused_with_the_reason():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=300, state_size=4))
    with pytest.raises(SharingError, match="layer 0 of 'mamba'"):
        share(model, every=2)