"""The layer-by-layer runner: windows, block inputs, shared Hessians, GPTQ end to end, resume."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.calibration import calibration_windows, input_hooks, run_block, sample_windows, walk_blocks
from hfcompress.errors import DataError
from hfcompress.models import ArchitectureError, decoder_blocks, final_norm
from hfcompress.quantization.gptq_runner import InputTracker

from conftest import tiny_bert, tiny_gpt2, tiny_llama


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=96, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=300, word_embed_proj_dim=96, max_position_embeddings=256,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1)).eval()


WINDOWS = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def gptq(**options):
    return {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 64, **options}}]}


def test_windows_are_reproducible_and_checked():
    ids = torch.arange(5000)
    a, b = sample_windows(ids, 8, 64, seed=3), sample_windows(ids, 8, 64, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, sample_windows(ids, 8, 64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=a.dtype))  # contiguous spans
    assert torch.equal(calibration_windows(None, a, 4, 64, 0), a)  # ready windows are used whole
    with pytest.raises(DataError, match="fewer than one window"):
        sample_windows(torch.arange(10), 1, 64, 0)


def tiny_gemma3(**overrides):
    """Sliding-window and full-attention layers: each receives its own mask and rotary embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              **overrides)
    return Gemma3ForCausalLM(config).eval()


def last_hidden(model, windows=WINDOWS):
    """The last block's output for every window, as the walk computes it."""
    outs = {}
    blocks = decoder_blocks(model)
    for _ in walk_blocks(model, windows, observe=lambda b, x, out: outs.setdefault(b, []).append(out)):
        pass
    return torch.cat(outs[len(blocks) - 1])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_opt, tiny_bert, tiny_gemma3])
def test_block_inputs_reproduce_the_full_forward(make):
    model = make()
    with torch.no_grad():
        out = model(input_ids=WINDOWS, output_hidden_states=True)
    norm = final_norm(model) or torch.nn.Identity()
    # transformers reports the last hidden state after the final norm (BERT has none).
    assert torch.allclose(norm(last_hidden(model)), out.hidden_states[-1], atol=1e-5)


def test_sliding_window_layers_get_their_own_mask():
    """A walk that gave every block the first block's mask would compute other outputs."""
    model = tiny_gemma3()
    plain = tiny_gemma3()
    plain.config.layer_types = ["sliding_attention"] * 3
    for layer in plain.model.layers:
        layer.attention_type = layer.self_attn.attention_type = "sliding_attention"
        layer.self_attn.sliding_window = 8
    with torch.no_grad():
        full = model(input_ids=WINDOWS, output_hidden_states=True).hidden_states[-1]
        sliding = plain(input_ids=WINDOWS, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(full, sliding, atol=1e-4)  # the layer types matter here
    assert torch.allclose(model.model.norm(last_hidden(model)), full, atol=1e-5)


class BetweenBlocks(torch.nn.Module):
    """A model that transforms its hidden states between blocks, so blocks do not feed each other."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(300, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 16) for _ in range(3)])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, use_cache=False, outputs=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
            if outputs is not None:
                outputs.append(h)
            h = torch.tanh(h) + 1
        return h


def test_blocks_that_do_not_feed_each_other_are_replayed(caplog):
    model = BetweenBlocks()
    expected = []
    with torch.no_grad():
        model(WINDOWS, outputs=expected)
    with caplog.at_level("INFO", logger="hfcompress.calibration"):
        walked = last_hidden(model)
    assert "replays" in caplog.text
    assert torch.allclose(walked, expected[-1], atol=1e-6)


def test_gptq_works_on_families_detected_from_the_module_tree():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=300)).eval()
    hfcompress.compress(model, gptq(), calibration_data=WINDOWS)
    assert type(model.gpt_neox.layers[1].attention.query_key_value).__name__ == "QuantLinear"


def test_encoder_decoder_models_are_refused_clearly():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100))
    with pytest.raises(ArchitectureError, match="encoder-decoder"):
        hfcompress.compress(model, gptq(), calibration_data=WINDOWS)


def test_linears_reading_one_input_share_a_hessian():
    model = tiny_llama()
    block = decoder_blocks(model)[0]
    inputs = next(walk_blocks(model, WINDOWS)).inputs
    targets = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    tracker = InputTracker()
    with input_hooks(targets, tracker):
        run_block(block, inputs, torch.device("cpu"))
    assert tracker.order == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert tracker.groups["self_attn.q_proj"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert tracker.groups["mlp.gate_proj"] == ["mlp.gate_proj", "mlp.up_proj"]
    assert tracker.counts["mlp.down_proj"] == WINDOWS.numel()
    assert set(tracker.hessians) == set(tracker.order)


@pytest.mark.parametrize("options", [{}, {"true_sequential": True}, {"true_sequential": True, "asymmetric": 0.25,
                                                                      "hessian_dtype": "bfloat16"}, {"act_order": True},
                                     {"act_order": True, "static_groups": True}, {"mse": True, "sym": False}])
def test_gptq_end_to_end_on_a_tiny_llama(tmp_path, tiny_llama_dir, options):
    windows = torch.randint(2, 300, (8, 64), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hfcompress.compress(model, gptq(**options), calibration_data=windows)
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, hfcompress.QuantLinear)
    assert (layer.g_idx is not None) == (options.get("act_order", False) and not options.get("static_groups", False))
    ids = windows[:2]
    expected = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "q")(ids).logits, expected)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_opt, tiny_bert])
def test_gptq_on_other_families(make):
    model = make()
    hfcompress.compress(model, gptq(), calibration_data=WINDOWS)
    quantized = [m for m in model.modules() if isinstance(m, hfcompress.QuantLinear)]
    assert len(quantized) >= 8


def test_gptq_through_from_pretrained_with_the_model_tokenizer(tiny_llama_dir, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("A calibration sentence about the weather in Bath. " * 400)
    recipe = {"calibration": {"data": str(text), "samples": 4, "seq_len": 64}, **gptq()}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, compression=recipe)
    assert isinstance(model.model.layers[0].mlp.down_proj, hfcompress.QuantLinear)
    assert model.config.quantization_config.recipe.calibration.samples == 4


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, tiny_llama_dir, monkeypatch):
    from hfcompress.quantization import gptq_runner

    windows = torch.randint(2, 300, (4, 64), generator=torch.Generator().manual_seed(2))
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    hfcompress.compress(whole, gptq(), calibration_data=windows)
    whole.save_pretrained(tmp_path / "whole")

    calls = {"n": 0}
    original = gptq_runner.GPTQBlockQuantizer.quantize_block

    def crash_in_second_block(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if Ctrl-C arrived during layer 2
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gptq_runner.GPTQBlockQuantizer, "quantize_block", crash_in_second_block)
    state = tmp_path / "state"
    with pytest.raises(KeyboardInterrupt):
        hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), gptq(), calibration_data=windows,
                            resume_dir=state)
    solved = []

    def count(self, *args, **kwargs):
        solved.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gptq_runner.GPTQBlockQuantizer, "quantize_block", count)
    resumed = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert len(resumed.model.layers) == 2
    hfcompress.compress(resumed, gptq(), calibration_data=windows, resume_dir=state)
    assert len(solved) == 1  # block 1 came from the saved state; only block 2 was solved again
    resumed.save_pretrained(tmp_path / "resumed")
    assert (tmp_path / "resumed" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "resumed" / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()

    with pytest.raises(hfcompress.errors.UserError, match="other arguments"):
        hfcompress.compress(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), gptq(bits=3),
                            calibration_data=windows, resume_dir=state)


def test_token_windows_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"input_ids": WINDOWS}, tmp_path / "w.safetensors")
    assert torch.equal(calibration_windows(None, tmp_path / "w.safetensors", 128, 2048, 0), WINDOWS)
    save_file({"ids": WINDOWS}, tmp_path / "bad.safetensors")
    with pytest.raises(DataError, match="input_ids"):
        calibration_windows(None, tmp_path / "bad.safetensors", 128, 2048, 0)


def test_cli_resume_state_needs_resume_flag(tmp_path, tiny_llama_dir, capsys):
    from safetensors.torch import save_file

    from hfcompress.cli import main

    save_file({"input_ids": WINDOWS}, tmp_path / "w.safetensors")
    recipe = tmp_path / "g.yaml"
    recipe.write_text("stages:\n  - quantize: {method: gptq, bits: 4, group_size: 64}\n")
    out = tmp_path / "out"
    (tmp_path / "out.resume").mkdir()
    argv = ["compress", str(tiny_llama_dir), "--recipe", str(recipe), "--output", str(out),
            "--calibration-data", str(tmp_path / "w.safetensors"), "--no-eval"]
    assert main(argv) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    assert (out / "model.safetensors").exists() and not (tmp_path / "out.resume").exists()


def test_block_errors_match_each_modules_own_gptq():
    from hfcompress.quantization.gptq import gptq_quantize
    from hfcompress.quantization.gptq_runner import GPTQBlockQuantizer
    from hfcompress.recipe import QuantizeStage

    model = tiny_llama()  # float32: the weights the runner reads share storage with the modules
    block = decoder_blocks(model)[0]
    inputs = next(walk_blocks(model, WINDOWS)).inputs
    targets = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    originals = {n: m.weight.detach().clone() for n, m in targets.items()}
    stage = QuantizeStage(method="gptq", bits=4, group_size=32, true_sequential=False)
    tracker = InputTracker()
    with input_hooks(targets, tracker):
        run_block(block, inputs, torch.device("cpu"))
    results = GPTQBlockQuantizer(stage, torch.device("cpu")).quantize_block(block, targets, inputs)
    for name in ["self_attn.k_proj", "mlp.up_proj"]:
        leader = next(lead for lead, members in tracker.groups.items() if name in members)
        alone = gptq_quantize(originals[name], tracker.hessians[leader], 4, 32, True, shrink=stage.shrink,
                              scale_dtype=results[name].weight.scales.dtype)
        assert results[name].error > 0
        assert results[name].error == pytest.approx(alone.error, rel=1e-4)
        assert torch.equal(results[name].weight.q, alone.weight.q)
