"""What a saved folder holds: methods, sizes per module type and bits per weight.

Reads ``config.json`` and the safetensors headers only (no tensor data, no model code; the
two-integer ``weight_shape`` tensors of compressed-tensors folders excepted), so it works on any
folder, compressed or not, in our native format or compressed-tensors. ``linear_shapes`` (``{module: (in, out)}``) gives exact
weight counts for packed layers; without it they are read off the packed shapes, which is exact
unless ``in_features * bits`` is not a multiple of 32.

Example (on a folder saved by ``save_pretrained``)::

    summary = summarize_folder("my-model-w4")
    summary["bits_per_weight"], summary["by_type"]["quantized linear"]["bits_per_weight"]
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import recorded_stages
from .errors import CheckpointError
from .formats.checkpoint import read_tensor_headers, stored_names
from .formats.folder import load_config_file, read_config_dict

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_BYTES.get(dtype, 4)
    for dim in shape:
        n *= dim
    return n


def tensor_nbytes(files) -> dict[str, int]:
    """Bytes of every tensor in safetensors ``files``, read from their headers only."""
    return {key: _nbytes(dtype, shape) for key, (dtype, shape) in read_tensor_headers(files).items()}


_BLOCK = re.compile(r"\.\d+\.")  # a name inside a stack of blocks (layers.3.)


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe", "shared")


def _module_type(module: str, shape: tuple[int, ...]) -> str:
    if _is_embedding(module):
        return "embedding"
    if len(shape) == 3:
        return "float experts"
    if module.rsplit(".", 1)[-1] == "lm_head" or len(shape) == 2:
        return "float linear"
    return "other (norms, biases)"


def _quantized_type(module: str) -> str:
    if _is_embedding(module):
        return "quantized embedding"
    return "quantized experts" if ".experts." in module else "quantized linear"


def _params_of(module: str, shapes: dict, formats: dict, linear_shapes: dict | None) -> int:
    """Parameters stored under ``module`` (packed layers counted as the weights they hold)."""
    total = 0
    for key, shape in shapes.items():
        if not key.startswith(module + "."):
            continue
        tensor = key[len(module) + 1:]
        if module in formats and tensor != "bias":
            if tensor == "qweight":
                in_features = (linear_shapes or {}).get(module, (shape[0] * 32 // formats[module]["bits"],))[0]
                total += in_features * shape[1]
            continue
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def _packed_weight_shapes(files: list[Path], model_name: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` of the compressed-tensors packed linears in ``files``, from their
    ``weight_shape`` tensors (two integers each; safetensors, nothing unpickled)."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight_shape"):
                    name = model_name.get(key, key).removesuffix(".weight_shape")
                    shapes[name] = tuple(int(v) for v in handle.get_tensor(key).tolist())
    return shapes


def _reused_params(config: dict, qconfig: dict, shapes: dict, formats: dict, linear_shapes: dict | None) -> int:
    """Parameters the network uses more than once: tied embeddings, layers that share modules."""
    reused = 0
    if qconfig.get("quant_method") == "hfcompress":
        for owner in ((qconfig.get("shared") or {}).get("modules") or {}).values():
            reused += _params_of(owner, shapes, formats, linear_shapes)
    text = config.get("text_config") or config
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    vocab, width = text.get("vocab_size"), text.get("hidden_size") or text.get("n_embd") or text.get("d_model")
    matrices = [key for key, shape in shapes.items() if tuple(shape) == (vocab, width)]
    if tied and vocab and width and len(matrices) == 1:  # one stored matrix, read as input and as output
        reused += vocab * width
    return reused



def summarize_folder(directory: str | os.PathLike, linear_shapes: dict[str, tuple[int, int]] | None = None) -> dict:
    """A JSON-ready summary of a saved model folder."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json; not a saved transformers model folder")
    config = read_config_dict(load_config_file(config_path))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no .safetensors files; hfcompress reads safetensors checkpoints only")
    stored = read_tensor_headers(files)
    names = stored_names(directory, config, stored)
    headers = {name: stored[key] for name, key in names.items()}
    shapes = {key: shape for key, (_, shape) in headers.items()}
    packed_shapes = _packed_weight_shapes(files, {key: name for name, key in names.items()})

    qconfig = config.get("quantization_config") or {}
    formats = {}
    if qconfig.get("quant_method") == "hfcompress":
        for group in qconfig.get("quantized", []):
            for name in group["modules"]:
                formats[name] = group
    by_type: dict[str, dict[str, float]] = {}

    def add(kind: str, params: int, nbytes: int) -> None:
        entry = by_type.setdefault(kind, {"params": 0, "bytes": 0})
        entry["params"] += params
        entry["bytes"] += nbytes

    block_total = block_float = 0  # weight matrices inside the blocks: how many stayed in float
    for key, (dtype, shape) in headers.items():
        module, _, tensor = key.rpartition(".")
        nbytes = _nbytes(dtype, shape)
        in_block = bool(_BLOCK.search(key)) and not _is_embedding(module)
        if module in packed_shapes:  # compressed-tensors pack-quantized: weight_shape says what it holds
            n, k = packed_shapes[module]
            if tensor == "bias":
                add("other (norms, biases)", shape[0], nbytes)
            else:
                add(_quantized_type(module), n * k if tensor == "weight_packed" else 0, nbytes)
                block_total += n * k if in_block and tensor == "weight_packed" else 0
            continue
        if module in formats:
            group = formats[module]
            if tensor == "qweight":
                if linear_shapes and module in linear_shapes:
                    in_features = linear_shapes[module][0]
                else:
                    in_features = shape[0] * 32 // group["bits"]
                add(_quantized_type(module), in_features * shape[1], nbytes)
                block_total += in_features * shape[1] if in_block else 0
            elif tensor == "bias":
                add("other (norms, biases)", shape[0], nbytes)
            else:
                add(_quantized_type(module), 0, nbytes)
            continue
        params = 1
        for dim in shape:
            params *= dim
        add(_module_type(module, shape), params, nbytes)
        if in_block and len(shape) >= 2:
            block_total += params
            block_float += params

    for entry in by_type.values():
        entry["bits_per_weight"] = round(8 * entry["bytes"] / entry["params"], 3) if entry["params"] else None
    params = sum(e["params"] for e in by_type.values())
    reused = _reused_params(config, qconfig, shapes, formats, linear_shapes)
    tensor_bytes = sum(e["bytes"] for e in by_type.values())
    methods = []
    if qconfig.get("quant_method") == "hfcompress":
        for name, options in recorded_stages(qconfig):
            methods.append(f"{name}:{options.get('method', 'rtn')}" if name == "quantize" else name)
    elif qconfig:
        methods.append(str(qconfig.get("quant_method")))
    return {
        "folder": str(directory),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "methods": methods,
        "quantized": [{k: v for k, v in g.items() if k != "modules"} | {"modules": len(g["modules"])}
                      for g in qconfig.get("quantized", [])] if qconfig.get("quant_method") == "hfcompress" else [],
        "params": params,
        "unique_params": params,
        "total_params": params + reused,
        "tensor_bytes": tensor_bytes,
        "file_bytes": sum(f.stat().st_size for f in files),
        "folder_bytes": sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()),
        "bits_per_weight": round(8 * tensor_bytes / params, 3) if params else None,
        "float_share": round(block_float / block_total, 4) if block_total else 0.0,
        "by_type": by_type,
        "metrics": qconfig.get("metrics", {}) if qconfig.get("quant_method") == "hfcompress" else {},
    }


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def format_summary(summary: dict) -> str:
    """The summary as a terminal table."""
    lines = [
        f"{summary['folder']}: {summary['model_type']} ({', '.join(summary['architectures'] or [])})",
        f"methods: {', '.join(summary['methods']) or 'none (float checkpoint)'}",
    ]
    for group in summary["quantized"]:
        lines.append(f"  {group['modules']} linear layers at {group['bits']} bits, group size {group['group_size']}, "
                     f"{'symmetric' if group['sym'] else 'asymmetric'}{', act-order' if group.get('act_order') else ''}")
    lines.append(f"{'module type':<24}{'params':>14}{'size':>12}{'bits/weight':>13}")
    for kind, entry in sorted(summary["by_type"].items()):
        bpw = f"{entry['bits_per_weight']:.2f}" if entry["bits_per_weight"] is not None else "-"
        lines.append(f"{kind:<24}{entry['params']:>14,}{format_bytes(entry['bytes']):>12}{bpw:>13}")
    bpw = f"{summary['bits_per_weight']:.2f}" if summary["bits_per_weight"] is not None else "-"
    if summary["total_params"] != summary["unique_params"]:
        lines.append(f"shared: {summary['unique_params']:,} unique parameters stored, {summary['total_params']:,} "
                     "as the network uses them (tied or shared weights count once per use)")
    lines.append(f"{'total':<24}{summary['params']:>14,}{format_bytes(summary['tensor_bytes']):>12}{bpw:>13}")
    lines.append(f"weight matrices of the decoder blocks left in float: {summary['float_share']:.1%}")
    lines.append(f"files on disk: {format_bytes(summary['folder_bytes'])}")
    return "\n".join(lines)
