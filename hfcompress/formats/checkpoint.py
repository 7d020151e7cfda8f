"""Checks on a checkpoint before its tensors load: readable safetensors, every promised tensor.

transformers leaves a missing tensor uninitialized with only a warning; for a packed layer that
would be silent garbage, so a compressed checkpoint is checked against its config first.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import CompressionConfig
from ..errors import CheckpointError


def read_tensor_headers(files: Iterable[str | os.PathLike]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) over all files, reading headers only; never unpickles."""
    headers: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        file = os.fspath(file)
        if not file.endswith(".safetensors"):
            raise CheckpointError(
                f"{file}: hfcompress checkpoints are stored as safetensors only; re-save the model with "
                "save_pretrained (safe_serialization is the default)"
            )
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    headers[key] = (part.get_dtype(), tuple(part.get_shape()))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{file}: truncated or corrupt safetensors file ({err}); re-save or re-download the checkpoint"
            ) from None
    return headers


def read_tensor_shapes(files: Iterable[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all files, reading headers only; never unpickles anything."""
    return {key: shape for key, (_, shape) in read_tensor_headers(files).items()}


def loaded_names(model: nn.Module, keys: Iterable[str], packed: Iterable[str] = ()) -> dict[str, str]:
    """``{name in the model: name in the file}``: transformers renames some families' tensors on
    save (Mixtral's ``mlp`` back to ``block_sparse_moe``, Gemma 3's ``model.language_model`` to
    ``language_model.model``) and renames them back on load; this applies the load-time renaming,
    as it stands for a model whose ``packed`` modules hold packed tensors (see :func:`packed_conversions`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    if packed:
        mapping = packed_conversions(mapping, packed)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    return {rename_source_key(key, renamings, converters)[0]: key for key in keys}


def _pattern_matches(pattern: str, key: str) -> bool:
    """Whether a conversion pattern (a regex where ``*`` stands for a layer or expert index) names ``key``."""
    return re.search(pattern.replace(".*.", r".\d+.").replace("*", r"\d+"), key) is not None


def packed_conversions(conversions: list, packed: Iterable[str]) -> list:
    """transformers' weight conversions for a model whose ``packed`` modules (dotted names) hold
    our packed tensors: the converters that would split, merge or transpose one of their tensors
    are left out (they concern ``weight`` layouts, and ``qweight`` packs along other axes), so
    those modules save and load under their names in the model, as do renamings that would
    rename one of their names (other renamings stay)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    keys = [f"{name}.{tensor}" for name in packed for tensor in ("qweight", "weight_packed")]
    kept = []
    for conversion in conversions:
        if isinstance(conversion, WeightConverter):
            patterns = list(conversion.target_patterns) + list(conversion.source_patterns)
            if any(_pattern_matches(p, key) for p in patterns for key in keys):
                continue
        elif isinstance(conversion, WeightRenaming):
            # A load-time renaming must leave names that are already the model's alone; one that
            # renames a module to its parameter (Inkling 2's ``weight_proj`` -> ``weight_proj.weight``)
            # would send a packed module's tensors elsewhere.
            if any(rename_source_key(key, [conversion], [])[0] != key for key in keys):
                continue
        kept.append(conversion)
    return kept


def saving_conversions(model: nn.Module, packed: Iterable[str]) -> list | None:
    """The conversions ``save_pretrained`` reverses for ``model`` (see :func:`packed_conversions`)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:  # what transformers itself does for a model not made by from_pretrained
        conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return packed_conversions(conversions, packed) or None


def skeleton(directory: str | os.PathLike, config: dict) -> nn.Module | None:
    """The saved model's class built empty on the meta device (no weights, never remote code),
    without its quantization config; None when transformers has no such class."""
    architecture = (config.get("architectures") or [None])[0]
    try:
        import torch
        import transformers
        from transformers import AutoConfig

        cls = getattr(transformers, architecture, None) if architecture else None
        if cls is None:
            return None
        model_config = AutoConfig.from_pretrained(directory)
        if hasattr(model_config, "quantization_config"):
            del model_config.quantization_config
        with torch.device("meta"):
            return cls._from_config(model_config)
    except Exception:  # noqa: BLE001  (callers fall back to the names as stored)
        return None


def stored_names(directory: str | os.PathLike, config: dict, keys) -> dict[str, str]:
    """``{name in the model: name in the file}`` for the tensors of a saved folder, through
    transformers' load-time renaming (names as stored when the class cannot be built)."""
    model = skeleton(directory, config)
    return loaded_names(model, keys, packed_modules(config)) if model is not None else {key: key for key in keys}


def packed_modules(config: dict) -> list[str]:
    """The packed modules a saved ``config.json`` (as a dict) lists."""
    groups = (config.get("quantization_config") or {}).get("quantized") or []
    return [name for group in groups for name in group.get("modules", [])]


def check_quantized_checkpoint(files: Iterable[str | os.PathLike], model: nn.Module, config: CompressionConfig) -> None:
    """Raise :class:`CheckpointError` unless ``files`` hold every packed tensor ``model`` expects."""
    stored = read_tensor_headers(files)
    headers = {name: stored[key] for name, key in loaded_names(model, stored, config.modules).items()}
    prefix = getattr(model, "base_model_prefix", "")
    missing, wrong, kinds = [], [], []
    for name in config.modules:
        for buffer_name, buffer in model.get_submodule(name).state_dict(keep_vars=True).items():
            key = f"{name}.{buffer_name}"
            candidates = [key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")] if prefix else [key]
            found = next((headers[c] for c in candidates if c in headers), None)
            if found is None:
                missing.append(key)
            elif found[1] != tuple(buffer.shape):
                wrong.append(f"{key} {found[1]} (expected {tuple(buffer.shape)})")
            elif not _dtype_fits(found[0], buffer.dtype):
                kinds.append(f"{key} {found[0]} (expected {SAFETENSORS_DTYPES.get(buffer.dtype, buffer.dtype)})")
    if missing or wrong or kinds:
        problems = ([f"missing {k}" for k in missing[:5]] + [f"wrong shape {w}" for w in wrong[:5]]
                    + [f"wrong dtype {k}" for k in kinds[:5]])
        raise CheckpointError(
            f"the checkpoint does not match its hfcompress quantization_config ({len(missing)} tensors missing, "
            f"{len(wrong)} with wrong shapes, {len(kinds)} with wrong dtypes: {'; '.join(problems)}); it is "
            "incomplete or was edited: re-save it"
        )


SAFETENSORS_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
                      torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3", torch.bool: "BOOL"}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _dtype_fits(stored: str, expected: torch.dtype) -> bool:
    """Packed codes and indices load bit for bit, so their integer type must be exact; a float
    tensor (scales, bias) may be stored in another float precision, which loading converts."""
    if expected.is_floating_point:
        return stored in FLOAT_DTYPES
    return stored == SAFETENSORS_DTYPES.get(expected)


def sort_metadata_in_place(path: str | os.PathLike) -> None:
    """Sort the ``__metadata__`` keys of a safetensors header, in place.

    safetensors writes metadata from a hash map, so two saves of the same tensors can differ in
    byte order. Sorting the keys (same JSON, same length) makes a save reproducible byte for
    byte, which the resume guarantee and content hashes rely on. Tensor data is not touched.
    """
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.loads(raw)
        metadata = header.get("__metadata__")
        if not metadata or list(metadata) == sorted(metadata):
            return
        header = {"__metadata__": dict(sorted(metadata.items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(encoded) != len(raw.rstrip(b" ")):
            return  # formatted differently from what we expect: leave the file as written
        handle.seek(8)
        handle.write(encoded + b" " * (length - len(encoded)))
