"""A safetensors file written piece by piece: the layout is fixed from names, dtypes and shapes
alone, then each tensor's bytes go to their place whenever the tensor exists.

This is what lets a model larger than memory be saved while it is compressed block by block:
the header (every tensor's offsets) is known before any tensor is, so nothing needs to be held
until the end. The bytes are those ``safetensors.torch.save_file`` writes for the same tensors
and metadata (its order: dtypes from the widest down, names ascending within a dtype; a compact
JSON header padded with spaces to 8 bytes), checked by the tests, so a streamed save and an
in-memory save of the same model hash the same.

>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "a.safetensors")
>>> with StreamWriter(path, {"x": (torch.float32, (2,)), "y": (torch.int32, (1,))}) as writer:
...     writer.write("y", torch.tensor([7], dtype=torch.int32))
...     writer.write("x", torch.tensor([1.0, 2.0]))
>>> from safetensors.torch import load_file
>>> load_file(path)["y"].tolist()
[7]
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_DTYPES

# safetensors' Dtype enum in declaration order; files list tensors from the last (widest) down.
_DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                "F64", "I64", "U64"]


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return SAFETENSORS_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"safetensors cannot store {dtype}") from None


def layout(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
           metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``(header bytes with their length prefix, {name: (start, end) in the data section})``."""
    order = sorted(entries, key=lambda name: (-_DTYPE_ORDER.index(dtype_name(entries[name][0])), name))
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offsets, position = {}, 0
    for name in order:
        dtype, shape = entries[name]
        size = math.prod(shape) * dtype.itemsize
        offsets[name] = (position, position + size)
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded, offsets


class StreamWriter:
    """Write a safetensors file whose tensors are declared up front and supplied in any order.

    ``close`` (or leaving the ``with`` block) fails if a declared tensor was never written; an
    error inside the block leaves the partial file for the caller's staging folder to discard.
    """

    def __init__(self, path: str | os.PathLike, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = {name: (dtype, tuple(int(d) for d in shape)) for name, (dtype, shape) in entries.items()}
        head, self.offsets = layout(self.entries, metadata)
        self._base = len(head)
        self._missing = set(self.entries)
        self._file = open(self.path, "wb")
        self._file.write(head)
        self._file.truncate(self._base + max((end for _, end in self.offsets.values()), default=0))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self._declared(name)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: declared {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self.write_pieces(name, [tensor])

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Tensor ``name`` given as consecutive pieces of its flattened values (a tensor read a
        part at a time, never whole in memory)."""
        dtype, shape = self._declared(name)
        start, end = self.offsets[name]
        self._file.seek(self._base + start)
        written = 0
        for piece in pieces:
            if piece.dtype != dtype:
                raise ValueError(f"{name}: declared {dtype}, got a piece of {piece.dtype}")
            data = piece.detach().to("cpu").contiguous()
            if data.numel():
                # Bytes as stored in memory (little-endian on every platform torch runs on),
                # handed over without a copy.
                self._file.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
                written += data.numel() * data.element_size()
        if written != end - start:
            raise ValueError(f"{name}: declared {dtype} {list(shape)} ({end - start} bytes), got {written} bytes")
        self._missing.discard(name)

    def _declared(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if name not in self.entries:
            raise KeyError(f"{name} was not declared for {self.path.name}")
        return self.entries[name]

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        if self._missing:
            count = len(self._missing)
            raise RuntimeError(f"{self.path.name}: {count} declared tensor{'s were' if count > 1 else ' was'} never "
                               f"written (e.g. {sorted(self._missing)[0]})")

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self._file.close()
