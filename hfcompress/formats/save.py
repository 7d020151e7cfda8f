"""Which format ``save_pretrained`` writes for a compressed model (see :mod:`.folder`).

``save_format``:

- ``"auto"`` (default): compressed-tensors whenever it holds the model exactly and hfcompress
  reads it back bit for bit (4- or 8-bit linears, groups that divide every layer, no act-order
  group index, no quantized embedding table, no raw packed tensors, experts as the Hub stores
  them, no stored-once sharing, no per-layer pruned shapes); else the native format. The log
  says which, and why not compressed-tensors.
- ``"compressed-tensors"``: that format, or an error naming what it cannot hold.
- ``"native"``: hfcompress's own format (loads only with hfcompress).

transformers' ``save_pretrained`` writes the native tensors first (its sharding, renaming and
tied-weight handling all apply); :func:`finish_save` then rewrites the folder in place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import UserError
from .export import ExportError, convert_folder, write_config, write_tensors
from .folder import mark_native, native_refs
from .shards import file_metadata

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("auto", "native", "compressed-tensors")


def check_save_format(save_format: str) -> str:
    if save_format not in SAVE_FORMATS:
        raise UserError(f"unknown save format {save_format!r}; valid: {', '.join(SAVE_FORMATS)}")
    return save_format


def finish_save(directory: str | os.PathLike, save_format: str = "auto", max_shard_size: int | str = "5GB") -> str:
    """Rewrite the native save in ``directory`` in ``save_format``; return the format written."""
    check_save_format(save_format)
    directory = Path(directory)
    config, tensors = native_refs(directory)  # read one at a time while the new files are written
    if save_format != "native":
        if config["quantization_config"].get("quantized"):
            try:
                tensors, config = convert_folder(directory, "compressed-tensors", config, tensors, for_hfcompress=True)
            except ExportError as err:
                if save_format == "compressed-tensors":
                    raise ExportError(f"save_format='compressed-tensors': {err}; save with save_format='native' "
                                      "(or 'auto', which picks it)") from None
                logger.info("saving in hfcompress's native format (loads only with hfcompress), not "
                            "compressed-tensors: %s", err)
            else:
                write_tensors(directory, tensors, max_shard_size)
                write_config(directory, config)
                logger.info("saved in the compressed-tensors format (loads in stock transformers with "
                            "compressed-tensors, in vLLM, and in hfcompress)")
                return "compressed-tensors"
        elif save_format == "compressed-tensors":
            raise ExportError("save_format='compressed-tensors': nothing is quantized; the other changes need "
                              "hfcompress's native format")
    # Written again, with the metadata transformers gave the files: the same model saves to the same bytes.
    metadata = file_metadata(next(iter(tensors.values())).file) if tensors else None
    write_tensors(directory, tensors, max_shard_size, metadata)
    path = directory / "config.json"
    write_config(directory, mark_native(json.loads(path.read_text(encoding="utf-8"))))
    return "native"
