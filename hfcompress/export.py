"""``hfcompress export``: a saved hfcompress folder written out in a format serving engines read.

The formats themselves (what each can express, how our tensors map to its own) are the
``EXPORTERS`` of :mod:`hfcompress.formats.export`; this module reads the folder, converts it,
and writes the result with the source's other files and a model card, atomically.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .card import write_folder_card
from .formats.export import EXPORTERS, ExportError, accepting_formats, convert_folder, write_config, write_tensors
from .formats.folder import model_files, read_native
from .output import atomic_output, check_output, output_lock

__all__ = ["EXPORTERS", "ExportError", "export_model", "write_folder"]

logger = logging.getLogger(__name__)


def export_model(folder: str | os.PathLike, fmt: str, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Export the hfcompress folder ``folder`` to ``fmt`` in ``output`` (atomically)."""
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORTERS)}")
    folder, output = Path(folder), Path(output)
    check_output(output, overwrite, sources=[folder])
    with output_lock(output):
        return _export(folder, fmt, output)


def _export(folder: Path, fmt: str, output: Path) -> Path:
    native_config, native_tensors = read_native(folder)
    record = native_config["quantization_config"]  # what hfcompress did, for the card
    try:
        tensors, config = convert_folder(folder, fmt, native_config, native_tensors)
    except ExportError as err:  # convert_folder leaves its inputs as they were: try the others on them
        others = [name for name, why in accepting_formats(folder, native_config, native_tensors).items()
                  if why is None and name != fmt]
        advice = (f"export to {' or '.join(others)} instead" if others else
                  "no export format holds this model: keep the hfcompress folder, which loads with `import hfcompress`")
        raise ExportError(f"{err}; {advice}") from None
    write_folder(folder, output, tensors, config, record)
    logger.info("exported %s to %s (%s)", folder, output, fmt)
    return output


def write_folder(source: Path, output: Path, tensors: dict, config: dict, record: dict) -> None:
    """``output`` holding ``tensors`` and ``config``, the other files of ``source`` (tokenizer,
    generation config ...) and a model card for its format (from ``record``, what hfcompress did),
    written to a temporary folder renamed at the end."""
    with atomic_output(output, overwrite=True, sources=[source]) as staging:
        for item in model_files(source):
            if not item.name.endswith((".safetensors", ".safetensors.index.json")) \
                    and item.name not in ("config.json", "README.md"):
                shutil.copy2(item, staging / item.name)
        write_tensors(staging, tensors)
        write_config(staging, config)
        write_folder_card(staging, record=record)
