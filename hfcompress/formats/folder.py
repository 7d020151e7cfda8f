"""What a folder saved by hfcompress holds, read back the same way whichever format it is in.

A quantized model is saved in one of two formats (``formats/save.py`` picks):

- **compressed-tensors** (``quant_method: "compressed-tensors"``, ``pack-quantized``): what stock
  transformers + the compressed-tensors package and vLLM load without us. The record of what
  hfcompress did (recipe, metrics, base model: our ``CompressionConfig``) rides along in
  ``config.json`` under the top-level key ``hfcompress``, with ``"storage": "compressed-tensors"``;
  hfcompress, when imported, reads such a folder itself, bit for bit.
- **native** (``quant_method: "hfcompress"``), for what compressed-tensors cannot express. Stock
  transformers would load it with only a warning, leave the packed layers' weights random and
  return a model that generates noise; so the saved ``model_type`` carries :data:`NATIVE_MARK`,
  which no transformers knows: loading without hfcompress fails with an error that quotes it,
  telling the user what to install and import. hfcompress removes the mark as it reads the file.

:func:`read_config_dict` undoes both, for every ``config.json`` transformers reads once
hfcompress is imported (``integration/patches.py``), and for our own readers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import QUANT_METHOD, check_record
from ..errors import CheckpointError
from . import compressed_tensors
from .checkpoint import stored_names
from .shards import file_refs

RECORD_KEY = "hfcompress"
NATIVE_MARK = " (hfcompress native format: pip install hfcompress, then import hfcompress before loading)"


def mark_native(config: dict) -> dict:
    """``config`` (a config.json dict) with the mark that makes stock transformers refuse it."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and not model_type.endswith(NATIVE_MARK):
        config["model_type"] = model_type + NATIVE_MARK
    return config


def read_config_dict(config: dict) -> dict:
    """A saved ``config.json`` dict as hfcompress reads it: the native mark removed, and a
    compressed-tensors folder written by hfcompress described by its hfcompress record (with
    ``storage: compressed-tensors``, so that the quantizer reads the tensors in that layout)."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type.endswith(NATIVE_MARK):
        config["model_type"] = model_type[: -len(NATIVE_MARK)]
    record = config.get(RECORD_KEY)
    quantization = config.get("quantization_config")
    if (isinstance(record, dict) and record.get("storage") == "compressed-tensors"
            and isinstance(quantization, dict) and quantization.get("quant_method") == "compressed-tensors"):
        config["quantization_config"] = dict(record)
        del config[RECORD_KEY]
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD:
        check_record(quantization)  # untrusted: every field checked before a reader builds on it
    return config


def load_config_file(path: str | os.PathLike) -> dict:
    """A ``config.json`` as a dict; a clear error for a file that is not UTF-8 JSON of a mapping."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a valid JSON config ({str(err)[:200]}); restore the file or save the "
                              "model again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}; restore the file")
    return config


def read_config(folder: str | os.PathLike) -> dict:
    """``config.json`` of ``folder``, through :func:`read_config_dict`."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a saved model folder")
    return read_config_dict(load_config_file(path))


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a file of ``folder`` may really live: inside it, or, for a snapshot of the Hugging Face
    cache (``.../snapshots/<revision>``, whose files link to ``../../blobs``), in its repository's blobs."""
    root = folder.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    return roots


def model_files(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The regular files of a model folder matching ``pattern``. A link is followed only to a file
    inside the folder (or its cache repository's blobs): a checkpoint cannot make us read, and
    copy into an export, a file from elsewhere on the machine."""
    folder = Path(folder)
    roots = _allowed_roots(folder)
    files = []
    for item in sorted(folder.glob(pattern)):
        if not item.is_file():
            continue
        if item.is_symlink() and not any(r == (t := item.resolve()) or r in t.parents for r in roots):
            raise CheckpointError(f"{item} links outside the model folder (to {item.resolve()}); copy the file "
                                  "into the folder if it belongs to the model")
        files.append(item)
    return files


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    files = model_files(folder, "*.safetensors")
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files; hfcompress reads safetensors checkpoints only")
    return files


def native_refs(folder: str | os.PathLike) -> tuple[dict, dict]:
    """``(config, {name: Ref})`` of a folder just saved in the native layout (a fresh
    ``save_pretrained``): the tensors stay on disk until written elsewhere."""
    config = read_config(folder)
    if (config.get("quantization_config") or {}).get("quant_method") != "hfcompress":
        raise CheckpointError(f"{folder} was not saved by hfcompress (no hfcompress quantization record in config.json)")
    files = safetensors_files(folder)
    try:
        return config, file_refs(files)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder}: truncated or corrupt safetensors file ({str(err)[:160]}); save again") from None


def read_native(folder: str | os.PathLike) -> tuple[dict, dict]:
    """``(config, tensors)`` of an hfcompress folder in the native layout, whichever format it
    was saved in (a compressed-tensors save is transposed back, bit for bit)."""
    config = read_config(folder)
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") != "hfcompress":
        raise CheckpointError(f"{folder} was not saved by hfcompress (no hfcompress quantization record in config.json)")
    tensors = {}
    for file in safetensors_files(folder):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({str(err)[:160]}); re-save or "
                                  "re-download the model") from None
    if qconfig.get("storage") == "compressed-tensors":
        file_names = stored_names(folder, config, tensors)  # {name in the model: name in the file}
        for group in qconfig.get("quantized", []):
            fmt = {k: v for k, v in group.items() if k != "modules"}
            for name in group["modules"]:
                stored = file_names.get(f"{name}.weight_packed", f"{name}.weight_packed").removesuffix(".weight_packed")
                parts = {suffix: tensors.pop(f"{stored}.{suffix}", None) for suffix in compressed_tensors.SUFFIXES}
                if parts["weight_packed"] is None:
                    raise CheckpointError(f"{folder}: {stored}.weight_packed is missing; the checkpoint is incomplete")
                ours = compressed_tensors.from_pack_quantized(parts, fmt)
                tensors.update({f"{stored}.{key}": value for key, value in ours.items()})
        qconfig.pop("storage")
    return config, tensors
