"""The small method patches that ``import hfcompress`` installs on ``PreTrainedModel``.

transformers rejects unknown ``from_pretrained`` arguments and has no hook for extra files at
save time, so the plugin wraps these methods, each of which only delegates:

- ``from_pretrained(..., compression=recipe)`` becomes
  ``from_pretrained(..., quantization_config=CompressionConfig(recipe))``. A GGUF file cannot be
  combined with a second quantizer inside transformers, so there (with either argument) the model
  loads first and :func:`hfcompress.compress` runs after.
- ``save_pretrained`` also writes a model card (``README.md``) for models hfcompress compressed
  (also those that save as plain checkpoints), and sorts the safetensors metadata of compressed
  ones so that the same model always saves to the same bytes.
- ``num_parameters()`` counts the parameters packed layers stand for (their weights are integer
  buffers, which transformers' count skips); packed weights are frozen, so never as trainable.
- ``push_to_hub`` uploads what ``save_pretrained`` wrote, card included (transformers' own would
  replace the card with a blank template).
- ``save_pretrained(..., save_format="auto"|"native"|"compressed-tensors")`` picks the format of
  a compressed model (:mod:`hfcompress.formats.save`); and every ``config.json`` transformers
  reads passes through :func:`hfcompress.formats.folder.read_config_dict`, which removes the mark
  that makes a native folder fail loudly without hfcompress and lets hfcompress read its own
  compressed-tensors folders bit for bit.

Models that hfcompress did not compress take the original code paths unchanged.
"""

from __future__ import annotations

import functools
import logging
import tempfile

from transformers import PreTrainedConfig, PreTrainedModel

from ..config import CompressionConfig, compression_record

logger = logging.getLogger(__name__)

_ORIGINALS: dict[str, object] = {}


def is_compressed(model) -> bool:
    """Whether ``model`` carries an hfcompress config (it was compressed or loaded compressed)."""
    return isinstance(getattr(getattr(model, "config", None), "quantization_config", None), CompressionConfig)


def _from_pretrained(original, cls, *args, compression=None, **kwargs):
    config = kwargs.get("quantization_config")
    if compression is not None and config is not None:
        raise ValueError("pass either compression= or quantization_config=, not both")
    if kwargs.get("gguf_file") and (compression is not None or isinstance(config, CompressionConfig)):
        kwargs.pop("quantization_config", None)
        config = CompressionConfig(recipe=compression) if compression is not None else config
        return _load_gguf_then_compress(original, cls, args, kwargs, config)
    if compression is not None:
        kwargs["quantization_config"] = CompressionConfig(recipe=compression)
    return original(cls, *args, **kwargs)


def _load_gguf_then_compress(original, cls, args, kwargs, config: CompressionConfig):
    """transformers refuses a quantizer on a GGUF file: load it in float, then compress."""
    from transformers import AutoTokenizer

    from .compress import compress

    if config.recipe is None:
        raise ValueError("CompressionConfig has no recipe to apply to this GGUF file: pass CompressionConfig(recipe=...)")
    model = original(cls, *args, **kwargs)
    tokenizer = None
    if any(stage.needs_calibration for stage in config.recipe.stages):
        tokenizer = AutoTokenizer.from_pretrained(args[0], gguf_file=kwargs["gguf_file"])
    return compress(model, config.recipe, tokenizer=tokenizer, config=config)


def _save_pretrained(original, self, save_directory, *args, save_format="auto", **kwargs):
    from ..formats.save import check_save_format

    kwargs["save_format"] = check_save_format(save_format)
    modules = getattr(getattr(self.config, "quantization_config", None), "modules", None) if is_compressed(self) else None
    if not modules:
        return _save_and_finish(original, self, save_directory, *args, **kwargs)
    from ..formats.checkpoint import saving_conversions
    from ..quantization.trainable import check_frozen

    check_frozen(self)

    missing = object()
    before = getattr(self, "_weight_conversions", missing)
    self._weight_conversions = saving_conversions(self, modules)  # packed tensors keep their names
    try:
        return _save_and_finish(original, self, save_directory, *args, **kwargs)
    finally:
        if before is missing:
            del self._weight_conversions
        else:
            self._weight_conversions = before


def _has_record(model) -> bool:
    """Whether hfcompress compressed ``model``, also when it saves as a plain checkpoint."""
    return is_compressed(model) or compression_record(model) is not None


def _save_and_finish(original, self, save_directory, *args, save_format="auto", **kwargs):
    result = original(self, save_directory, *args, **kwargs)
    if is_compressed(self) and kwargs.get("is_main_process", True):
        from pathlib import Path

        from ..formats.save import finish_save

        self.hfcompress_saved_format = finish_save(save_directory, save_format,
                                                   kwargs.get("max_shard_size", "5GB"))
    if _has_record(self) and kwargs.get("is_main_process", True):
        from ..card import write_model_card

        write_model_card(self, save_directory)  # plain checkpoints of compressed models get one too
    return result


def _push_to_hub(original, self, repo_id, *args, **kwargs):
    if not _has_record(self):
        return original(self, repo_id, *args, **kwargs)
    return _push_compressed(self, repo_id, **kwargs)


def _push_compressed(self, repo_id, *, commit_message=None, commit_description=None, private=None, token=None,
                     revision=None, create_pr=False, max_shard_size="50GB", tags=None):
    from huggingface_hub import HfApi

    if tags:
        self.add_model_tags(tags)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        self.save_pretrained(folder, max_shard_size=max_shard_size)
        from ..card import write_model_card

        write_model_card(self, folder, repo_id=repo_id)  # the card names the repository
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload model compressed with hfcompress",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


def _num_parameters(original, self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    total = original(self, only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
    if only_trainable or not is_compressed(self):
        return total
    from ..quantization.dequantize import packed_parameter_count

    return total + packed_parameter_count(self, exclude_embeddings)


def _read_config_file(original, cls, json_file):
    from ..formats.folder import read_config_dict

    return read_config_dict(original(cls, json_file))


def _wrap(name: str, wrapper, as_classmethod: bool = False, owner=PreTrainedModel) -> None:
    original = getattr(owner, name)
    original = original.__func__ if as_classmethod else original
    _ORIGINALS[name] = original

    @functools.wraps(original)
    def method(self_or_cls, *args, **kwargs):
        return wrapper(original, self_or_cls, *args, **kwargs)

    setattr(owner, name, classmethod(method) if as_classmethod else method)


def install() -> None:
    """Install the wrappers once (idempotent)."""
    if _ORIGINALS:
        return
    _wrap("from_pretrained", _from_pretrained, as_classmethod=True)
    _wrap("save_pretrained", _save_pretrained)
    _wrap("push_to_hub", _push_to_hub)
    _wrap("num_parameters", _num_parameters)
    _wrap("_dict_from_json_file", _read_config_file, as_classmethod=True, owner=PreTrainedConfig)
