"""Multimodal checkpoints: the language model is compressed, the vision tower and projector stay
float unless the recipe includes them, and the folder reloads with its processor."""

import pytest
import torch
from conftest import make_tokenizer
from torch import nn
from transformers import (AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessorPil, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

import hfcompress
from hfcompress.cli import main
from hfcompress.quantization.qlinear import QuantLinear


def tiny_llava():
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=300))


@pytest.fixture
def llava_dir(tmp_path):
    model = tiny_llava()
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                     crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, image_token="<image>")
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    return tmp_path / "llava"


def test_cli_compresses_the_language_model_and_saves_the_processor(tmp_path, llava_dir):
    out = tmp_path / "out"
    assert main(["compress", str(llava_dir), "--recipe", "w4-rtn", "--output", str(out), "--no-eval"]) == 0
    assert (out / "preprocessor_config.json").is_file() or (out / "processor_config.json").is_file()
    assert isinstance(AutoProcessor.from_pretrained(out), LlavaProcessor)
    model = AutoModelForImageTextToText.from_pretrained(out)
    language = [m for n, m in model.named_modules() if n.startswith("model.language_model.layers")]
    vision = [m for n, m in model.named_modules() if n.startswith(("model.vision_tower", "model.multi_modal_projector"))]
    assert any(isinstance(m, QuantLinear) for m in language)
    assert not any(isinstance(m, QuantLinear) for m in vision) and any(isinstance(m, nn.Linear) for m in vision)


def test_include_quantizes_the_vision_tower_too():
    model = tiny_llava()
    hfcompress.compress(model, {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32,
                                                         "include": ["model.vision_tower.*"]}}]})
    vision = dict(model.model.vision_tower.named_modules())
    assert isinstance(vision["encoder.layers.0.self_attn.q_proj"], QuantLinear)
    assert isinstance(model.model.multi_modal_projector.linear_1, nn.Linear)  # not named: float


@pytest.mark.parametrize("model_type", ["llava", "qwen3_vl", "paligemma", "idefics3"])
def test_gptq_on_image_text_models_reloads_identically_with_the_towers_in_float(tmp_path, model_type):
    from hfcompress.models import language_model_path
    from hfcompress.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(tiny_config(model_type)).float().eval()
    ids = torch.randint(5, 200, (4, 32), generator=torch.Generator().manual_seed(0))
    hfcompress.compress(model, {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]},
                        calibration_data=ids)
    text = language_model_path(model)
    packed = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert packed and all(name.startswith(text + ".") for name in packed)
    with torch.no_grad():
        expected = model(input_ids=ids[:2]).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForImageTextToText.from_pretrained(tmp_path)(input_ids=ids[:2]).logits, expected)
