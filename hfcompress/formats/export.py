"""Exports of a saved hfcompress folder to the formats serving engines read.

Each format is a small class in the ``EXPORTERS`` table that declares what it can express,
refuses with a clear message what it cannot, and maps our tensors to its own:

- ``gptq``: GPTQ v1 checkpoints (``quant_method: "gptq"``, ``checkpoint_format: "gptq"``),
  read by transformers + GPTQModel, vLLM, TGI and SGLang. Same packing as ours, but ``qzeros``
  hold the zero point minus one, and ``g_idx`` is always present.
- ``compressed-tensors``: ``pack-quantized`` (``quant_method: "compressed-tensors"``), read by
  transformers (with the ``compressed-tensors`` package) and vLLM. Tensors are per output row:
  ``weight_packed`` ``[N, ceil(K*bits/32)]`` holds the codes as signed values offset by
  ``2**(bits-1)``, which is exactly our unsigned code, so it is our ``qweight`` transposed.

Tensors take the names of the model's original Hub layout, which is what readers look up:
transformers already renames on save what it renamed on load (Mixtral's ``mlp`` back to
``block_sparse_moe``), and :func:`_hub_layout` undoes its expert fusion, splitting each expert's
``gate_up_proj`` back into the Hub's two linears (``w1``/``w3``, ``gate_proj``/``up_proj``) as
transformers' own conversion mapping declares them.

The export reads ``config.json`` and the safetensors files (the model class is built empty, on
the meta device, only to read its conversion mapping) and writes to a temporary folder renamed
at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import torch

from ..errors import UserError
from . import compressed_tensors
from .checkpoint import loaded_names, packed_modules, skeleton
from .folder import RECORD_KEY
from .shards import Derived, Part, loaded, replace_tensors
from ..quantization.packed_tensor import SUFFIX as PACKED_SUFFIX
from ..quantization.grid import group_index
from ..quantization.pack import pack_columns, unpack_columns

logger = logging.getLogger(__name__)


class ExportError(UserError):
    """The model uses something the target format cannot express."""


def _groups(qconfig: dict) -> list[dict]:
    groups = qconfig.get("quantized", [])
    if not groups:
        raise ExportError("the model has no quantized layers to export")
    return groups


def _single_format(qconfig: dict, target: str) -> dict:
    formats = {json.dumps({k: v for k, v in g.items() if k != "modules"}, sort_keys=True) for g in _groups(qconfig)}
    if len(formats) > 1:
        raise ExportError(f"{target} holds one quantization format per model; this one mixes {len(formats)}")
    return {k: v for k, v in _groups(qconfig)[0].items() if k != "modules"}


def _in_features(tensors: dict, name: str, bits: int, known: dict[str, int]) -> int:
    """The true in_features of packed linear ``name``: from the model (``known``) or ``g_idx``; from
    ``qweight``'s rows only where they hold no padding (``K * bits`` a multiple of 32)."""
    if name in known:
        return known[name]
    if f"{name}.g_idx" in tensors:
        return tensors[f"{name}.g_idx"].numel()
    rows = tensors[f"{name}.qweight"].shape[0]
    if rows * 32 % bits == 0 and bits in (2, 4, 8):
        return rows * 32 // bits
    raise ExportError(f"{name}: cannot tell its in_features from the files (the model class could not be built)")


class GPTQv1Exporter:
    """GPTQ v1: ``qweight``/``scales`` as ours, ``qzeros`` minus one, ``g_idx`` always."""

    name = "gptq"

    def convert(self, tensors: dict, config: dict, in_model: dict[str, str],
                in_features: dict[str, int]) -> tuple[dict, dict]:
        qconfig = config["quantization_config"]
        fmt = _single_format(qconfig, "GPTQ v1")
        bits, group_size = fmt["bits"], fmt["group_size"]
        if fmt["scale_dtype"] != "float16":
            raise ExportError(f"GPTQ v1 stores float16 scales; this model's are {fmt['scale_dtype']}")
        out = dict(tensors)
        modules = [name for g in _groups(qconfig) for name in g["modules"]]
        for name in modules:
            qweight = tensors[f"{name}.qweight"]
            n = qweight.shape[1]
            k = _in_features(tensors, name, bits, in_features)
            if (k * bits) % 32 or (n * bits) % 32:
                raise ExportError(f"{name}: GPTQ v1 packs whole int32 words; {k}x{n} at {bits} bits does not fill them")
            if group_size != -1 and k % group_size:
                raise ExportError(
                    f"{name}: in_features {k} is not a multiple of group_size {group_size} (a short last group); "
                    "GPTQ v1 readers expect in_features // group_size groups: quantize with a group size that "
                    "divides every layer (e.g. 64 for SmolLM2)"
                )
            zeros = unpack_columns(tensors[f"{name}.qzeros"], bits, n)
            if int(zeros.min()) < 1:
                raise ExportError(
                    f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (it stores zero minus one)"
                )
            out[f"{name}.qzeros"] = pack_columns(zeros - 1, bits)
            if f"{name}.g_idx" not in tensors:
                out[f"{name}.g_idx"] = group_index(k, group_size if group_size != -1 else k)
            if f"{name}.bias" in tensors:
                out[f"{name}.bias"] = tensors[f"{name}.bias"].to(torch.float16)
        gptq_config = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": bits,
            "group_size": group_size,
            "desc_act": bool(fmt.get("act_order", False)),
            "sym": bool(fmt["sym"]),
            "lm_head": any(name.endswith("lm_head") for name in modules),
            "true_sequential": True,
            "damp_percent": 0.01,
            "static_groups": False,
            "meta": {"quantizer": ["hfcompress"]},
        }
        return out, gptq_config


class CompressedTensorsExporter:
    """compressed-tensors ``pack-quantized`` (layout in :mod:`.compressed_tensors`)."""

    name = "compressed-tensors"

    def convert(self, tensors: dict, config: dict, in_model: dict[str, str],
                in_features: dict[str, int]) -> tuple[dict, dict]:
        """``in_model``: ``{Hub name: name in the transformers model}`` where they differ; targets
        name both, for transformers (which matches loaded modules) and vLLM (Hub names)."""
        groups = []
        out = dict(tensors)
        model_dtype = getattr(torch, config.get("dtype") or "", None)
        for group in _groups(config["quantization_config"]):
            fmt = {k: v for k, v in group.items() if k != "modules"}
            for name in group["modules"]:
                k = _in_features(tensors, name, fmt["bits"], in_features)
                reason = compressed_tensors.refusal(fmt, k, name)
                if reason:
                    raise ExportError(reason)
                own = {key: out.pop(key) for key in [key for key in out if key.startswith(f"{name}.")]}
                converted = Derived(lambda own=own, name=name, fmt=fmt, k=k: compressed_tensors.to_pack_quantized(
                    loaded(own), name, fmt, k, model_dtype))
                out.update({key: Part(converted, key) for key in converted.entries()})  # computed again when written
            groups.append((fmt, group["modules"]))
        return out, compressed_tensors.quantization_config(groups, in_model)


EXPORTERS = {cls.name: cls for cls in (GPTQv1Exporter, CompressedTensorsExporter)}


def _expand_shared(tensors: dict, config: dict) -> dict:
    """Write out every layer's copy of weights that layers share: the peer formats cannot express
    sharing, so their readers need each layer's tensors (the tied embeddings need nothing: the
    config's ``tie_word_embeddings`` says it and every reader honours it)."""
    qconfig = config["quantization_config"]
    shared = qconfig.get("shared") or {}
    users = shared.get("modules") or {}
    if not users:
        return tensors
    logger.info("export: writing %d shared modules once per layer that uses them", len(users))
    out = dict(tensors)
    for user, owner in users.items():
        for key, tensor in tensors.items():
            if key.startswith(owner + "."):
                out[user + key[len(owner):]] = tensor.clone()  # safetensors refuses tensors that share memory
    for group in qconfig.get("quantized", []):
        group["modules"] = group["modules"] + [user for user, owner in users.items() if owner in group["modules"]]
    return out


_EXPERT = re.compile(r"^(?P<stack>.+\.experts)\.(?P<index>\d+)\.(?P<leaf>\w+)$")


def _expert_sources(converters: list, leaf: str) -> list[str] | None:
    """The Hub's per-expert linear names that transformers fused into ``experts.<leaf>``, in the
    order it concatenated them; None when no conversion stacks per-expert linears into it."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    for converter in converters:
        if not any(t.endswith(f"experts.{leaf}") for t in converter.target_patterns):
            continue
        ops = [(type(op), getattr(op, "dim", None)) for op in converter.operations]
        if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
            return None  # another conversion (a transpose, an interleave): not a plain stack of linears
        leaves = [re.fullmatch(r".*experts\.\*\.(\w+)\.weight", p) for p in converter.source_patterns]
        return [m.group(1) for m in leaves] if all(leaves) else None
    return None


def _split_columns(tensors: dict, name: str, parts: list[str], bits: int) -> dict:
    """Split the packed linear ``name`` along its output features into ``len(parts)`` equal linears."""
    n = tensors[f"{name}.qweight"].shape[1]
    width = n // len(parts)
    if n % len(parts) or (width * bits) % 32:
        raise ExportError(f"{name}: {n} output features do not split into {len(parts)} packed linears at {bits} bits")
    zeros = unpack_columns(tensors[f"{name}.qzeros"], bits, n)
    out = {}
    for i, part in enumerate(parts):
        columns = slice(i * width, (i + 1) * width)
        out[f"{part}.qweight"] = tensors[f"{name}.qweight"][:, columns].contiguous()
        out[f"{part}.scales"] = tensors[f"{name}.scales"][:, columns].contiguous()
        out[f"{part}.qzeros"] = pack_columns(zeros[:, columns], bits)
        for extra in ("g_idx",):
            if f"{name}.{extra}" in tensors:
                out[f"{part}.{extra}"] = tensors[f"{name}.{extra}"].clone()
        if f"{name}.bias" in tensors:
            out[f"{part}.bias"] = tensors[f"{name}.bias"][columns].contiguous()
    return out


def _hub_layout(folder: Path, tensors: dict, config: dict, split_experts: bool = True) -> tuple[dict, dict, dict]:
    """The quantized modules under their original Hub names (see the module doc); the config's
    module lists follow. Also returns ``{Hub name: name in the transformers model}`` where the two
    differ (Gemma 3's ``language_model.model`` is ``model.language_model`` once loaded), so that
    targets can name both, and each quantized module's true ``in_features`` (from the model,
    built empty). Quantized embedding tables are refused: neither format has them; so are experts
    that would need splitting unless ``split_experts``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    qconfig = config["quantization_config"]
    model = skeleton(folder, config)
    if model is None:
        return tensors, {}, {}
    file_name = loaded_names(model, tensors, packed_modules(config))  # {name in the model: name in the file}
    converters = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]
    out = dict(tensors)
    in_model: dict[str, str] = {}
    in_features: dict[str, int] = {}
    for group in _groups(qconfig):
        hub_modules = []
        for name in group["modules"]:
            module = model.get_submodule(name) if _has_module(model, name) else None
            if isinstance(module, torch.nn.Embedding):
                raise ExportError(
                    f"{name}: GPTQ v1 and compressed-tensors have no quantized embedding table; quantize without "
                    "the embeddings option to export (the hfcompress folder keeps it and reloads with hfcompress)")
            if name.endswith(PACKED_SUFFIX):
                raise ExportError(f"{name}: packed as a raw tensor the model multiplies itself (not a linear layer), "
                                  "which GPTQ and compressed-tensors readers have no layout for")
            stored = file_name.get(f"{name}.qweight", f"{name}.qweight").removesuffix(".qweight")
            match = _EXPERT.match(stored)
            if match is None:
                hub_modules.append(stored)
                if hasattr(module, "in_features"):
                    in_features[stored] = module.in_features
                if stored != name:
                    in_model[stored] = name
                continue
            sources = _expert_sources(converters, match["leaf"])
            if sources is None:
                raise ExportError(
                    f"{stored}: {config.get('model_type')} checkpoints store their experts as one fused tensor, not one "
                    "linear per expert, so GPTQ and compressed-tensors readers have no names for quantized experts; "
                    "keep the hfcompress folder (it reloads with hfcompress), or quantize with the experts in float")
            if not split_experts and sources != [match["leaf"]]:
                raise ExportError(f"{stored}: the Hub layout splits these experts into {', '.join(sources)}, which "
                                  "hfcompress does not read back; `hfcompress export` writes that layout for other readers")
            parts = [f"{match['stack']}.{match['index']}.{leaf}" for leaf in sources]
            for key in [k for k in out if k.startswith(stored + ".")]:
                del out[key]
            out.update(_split_columns(tensors, stored, parts, group["bits"]) if len(parts) > 1 else
                       {f"{parts[0]}{k[len(stored):]}": v for k, v in tensors.items() if k.startswith(stored + ".")})
            hub_modules += parts
        group["modules"] = hub_modules
    shared = qconfig.get("shared") or {}
    if shared.get("modules"):
        shared["modules"] = {file_name.get(f"{u}.qweight", f"{u}.qweight").removesuffix(".qweight"):
                             file_name.get(f"{o}.qweight", f"{o}.qweight").removesuffix(".qweight")
                             for u, o in shared["modules"].items()}
    return out, in_model, in_features


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def convert_folder(folder: Path, fmt: str, config: dict, tensors: dict, for_hfcompress: bool = False) -> tuple[dict, dict]:
    """``(tensors, config.json dict)`` of the hfcompress model ``folder`` (its native ``config``
    and ``tensors``) in format ``fmt``. ``for_hfcompress``: a save that hfcompress itself reads
    back bit for bit (no expert splitting, no copies of shared layers); the record of what was
    done then rides along under the config's ``hfcompress`` key."""
    config = copy.deepcopy(config)
    record = copy.deepcopy(config["quantization_config"])
    if (record.get("shared") or {}).get("lora"):
        raise ExportError("this model shares layers with per-layer low-rank corrections (lora_rank), which GPTQ and "
                          "compressed-tensors readers cannot run; share with lora_rank: 0 to export")
    if for_hfcompress and (record.get("shared") or {}).get("modules"):
        raise ExportError("compressed-tensors cannot store layers that share weights once; hfcompress's native "
                          "format does (`hfcompress export` writes a copy per layer for other readers)")
    if for_hfcompress and record.get("pruned"):
        raise ExportError("layers pruned to different sizes need hfcompress to rebuild them")
    tensors, in_model, in_features = _hub_layout(folder, tensors, config, split_experts=not for_hfcompress)
    tensors = _expand_shared(tensors, config)
    tensors, config["quantization_config"] = EXPORTERS[fmt]().convert(tensors, config, in_model, in_features)
    config.pop(RECORD_KEY, None)
    if for_hfcompress:
        config[RECORD_KEY] = {**record, "storage": fmt}
    return tensors, config


def accepting_formats(folder: Path, config: dict, tensors: dict) -> dict[str, str | None]:
    """``{format: None if it can hold the model, else why not}`` for every export format."""
    verdicts = {}
    for name in EXPORTERS:
        try:
            convert_folder(folder, name, config, tensors)
            verdicts[name] = None
        except ExportError as err:
            verdicts[name] = str(err)
    return verdicts


def write_tensors(directory: Path, tensors: dict, max_shard_size: int | str = "5GB",
                  metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (tensors, or :mod:`.shards` references read when written) as sharded
    safetensors in ``directory``, replacing what was there; the same tensors give the same bytes."""
    replace_tensors(directory, tensors, max_shard_size, metadata)


def write_config(directory: Path, config: dict) -> None:
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
