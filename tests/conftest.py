"""Shared fixtures: tiny random models (Llama with GQA and tied embeddings, BERT, GPT-2) saved
with a tiny byte-level tokenizer, and the paths of the project's shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before any
# kernel is defined (hfcompress imports them lazily, so setting it here is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hfcompress  # noqa: E402,F401  (registers the plugin)
from hfcompress.data import bundled_text

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository, or ``$HFCOMPRESS_DATA``."""
    return Path(os.environ.get("HFCOMPRESS_DATA", REPO.parent / "shared" / "data"))


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    tok.train([str(bundled_text("evaluation"))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_llama(tie: bool = True, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # hidden 96 with group size 64 gives a ragged last group; 6 query heads share 2 key/value heads.
    options = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
                   tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    config = LlamaConfig(**{**options, **overrides})
    return LlamaForCausalLM(config).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=300, max_position_embeddings=128)
    return BertModel(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=96, n_head=4, vocab_size=300, n_positions=256,
                                      bos_token_id=0, eos_token_id=0)).eval()


def plan_command(tmp_path, model_dir, windows: torch.Tensor) -> tuple[list[str], Path, Path]:
    """``hfcompress plan`` arguments for ``model_dir`` (a 4-bit g32 GPTQ base recipe, ``windows``
    saved as calibration token windows, 2 for the sensitivity and 2 for the check), the planned
    recipe's path and the windows file's."""
    import yaml
    from safetensors.torch import save_file

    data = tmp_path / "windows.safetensors"
    save_file({"input_ids": windows}, data)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"calibration": {"samples": 4, "seq_len": 32}, "stages": [{"quantize": {
        "method": "gptq", "bits": 4, "group_size": 32, "sym": True}}]}))
    plan = tmp_path / "plan.yaml"
    return (["plan", str(model_dir), "--recipe", str(base), "--calibration-data", str(data), "--output", str(plan),
             "--sensitivity-windows", "2", "--check-windows", "2"], plan, data)


def model_output(model, ids):
    """Logits, or the last hidden state of an encoder without a head."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=96, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                                    vocab_size=300, word_embed_proj_dim=96, max_position_embeddings=256)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def _saved(tmp_path_factory, name, model, tokenizer):
    path = tmp_path_factory.mktemp("models") / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, "tiny-llama", tiny_llama(), tokenizer)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, "tiny-bert", tiny_bert(), tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    return _saved(tmp_path_factory, "tiny-gpt2", tiny_gpt2(), tokenizer)


W4G64 = {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 64, "sym": True}}]}


class Reads:
    """Paths opened for reading while ``watching`` (an audit hook: it sees every open, in any library)."""

    def __init__(self):
        self.watching = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.watching and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))


READS = Reads()  # one hook for the session: audit hooks cannot be removed


@torch.no_grad()
def scrambled(model):
    """``model`` with every parameter moved off its values: a resumed run must load its checkpoint
    to end where an uninterrupted one does."""
    for parameter in model.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.1 + 0.1)
    return model
