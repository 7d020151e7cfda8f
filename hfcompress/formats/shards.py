"""Sharded safetensors folders written one tensor (or one module) at a time.

A save maps tensor names to values of three kinds, so that no step needs the whole model in
memory: a tensor already in memory; a :class:`Ref`, a tensor of a safetensors file read only when
its turn comes; a :class:`Part`, one output of a :class:`Derived` computation (a packed module's
layout conversion), computed once for all its outputs when the first is written. The folder's
layout is planned from dtypes and shapes alone (a derived module is computed once more for them,
cheap next to reading the model), then every shard is a :class:`~.stream_writer.StreamWriter`.

Shards follow huggingface_hub's rules (greedy in name order, a new shard when the next tensor
would pass ``max_shard_size``, a tensor larger than that alone; ``model-00001-of-00002.safetensors``
and an index), with names taken in sorted order so that the same tensors always land in the same
files, however they were produced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import SAFETENSORS_DTYPES
from .stream_writer import StreamWriter

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Ref:
    """Tensor ``key`` of safetensors ``file``, read when used (in ``dtype`` when given: the dtype the
    model holds it in, which a float checkpoint may store in another precision)."""

    file: Path
    key: str
    stored: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    offset: int | None = None  # of the tensor's first byte in the file, when known

    @property
    def out_dtype(self) -> torch.dtype:
        return self.dtype or self.stored

    def numel(self) -> int:
        return math.prod(self.shape)

    def load(self) -> torch.Tensor:
        if self.offset is None:
            # The file is opened for this tensor alone: a mapping kept open would keep every page
            # read so far in the process's memory.
            with safe_open(self.file, framework="pt") as handle:
                tensor = handle.get_tensor(self.key)
        else:
            tensor = torch.empty(self.shape, dtype=self.stored)
            with open(self.file, "rb", buffering=0) as handle:
                _read_into(handle, self.offset, tensor.view(-1))
        return tensor.to(self.dtype) if self.dtype is not None and tensor.dtype != self.dtype else tensor

    def pieces(self, nbytes: int = 64 << 20) -> Iterator[torch.Tensor]:
        """The tensor's values in order, flat, ``nbytes`` of the stored dtype at a time (in
        :attr:`out_dtype`): a copy of a large tensor that never holds it whole."""
        if self.offset is None:
            yield self.load().view(-1)
            return
        step = max(1, nbytes // self.stored.itemsize)
        with open(self.file, "rb", buffering=0) as handle:
            for start in range(0, self.numel(), step):
                piece = torch.empty(min(step, self.numel() - start), dtype=self.stored)
                _read_into(handle, self.offset + start * self.stored.itemsize, piece)
                yield piece.to(self.out_dtype)


def _read_into(handle, offset: int, flat: torch.Tensor) -> None:
    """Fill the 1-D ``flat`` with the bytes at ``offset`` of the open file ``handle``. Plain reads
    rather than a memory map: mapped pages count in the process's memory for as long as the
    mapping lives, which doubled a large tensor's cost while it was copied out."""
    if not flat.numel():
        return
    buffer = memoryview(flat.view(torch.uint8).numpy())
    handle.seek(offset)
    done = 0
    while done < len(buffer):
        read = handle.readinto(buffer[done:])
        if not read:
            raise OSError(f"{handle.name}: the file ends inside a tensor (truncated?); download or write it again")
        done += read


def _data_offsets(file: str | os.PathLike) -> dict[str, int]:
    """``{tensor: offset of its first byte}`` from a safetensors file's header (8 bytes of length,
    then JSON whose ``data_offsets`` count from the header's end)."""
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {key: 8 + length + entry["data_offsets"][0] for key, entry in header.items() if key != "__metadata__"}


def file_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file."""
    with safe_open(file, framework="pt") as handle:
        return dict(handle.metadata() or {})


def loaded(tensors: dict) -> dict[str, torch.Tensor]:
    """``tensors`` with every :class:`Ref` read."""
    return {name: value.load() if isinstance(value, Ref) else value for name, value in tensors.items()}


def file_refs(files, dtype_of: Callable[[str, torch.dtype], torch.dtype | None] | None = None) -> dict[str, Ref]:
    """Every tensor of ``files`` as a :class:`Ref` (headers only); ``dtype_of(name, stored)`` may
    ask for another dtype on load."""
    refs = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:  # checks the header (a clear error if corrupt)
            offsets = _data_offsets(file)
            for key in handle.keys():
                part = handle.get_slice(key)
                stored = _STORED_DTYPES[part.get_dtype()]
                want = dtype_of(key, stored) if dtype_of is not None else None
                refs[key] = Ref(Path(file), key, stored, tuple(part.get_shape()), want if want != stored else None,
                                offsets[key])
    return refs


@dataclass(eq=False)
class Derived:
    """Tensors computed together by ``compute()`` (e.g. one module's converted layout)."""

    compute: Callable[[], dict[str, torch.Tensor]]
    _entries: dict | None = field(default=None, repr=False)

    def entries(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if self._entries is None:
            self._entries = {name: (t.dtype, tuple(t.shape)) for name, t in self.compute().items()}
        return self._entries


@dataclass(frozen=True)
class Part:
    """Output ``key`` of ``source``."""

    source: Derived
    key: str


def parse_size(size: int | str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    return size if isinstance(size, int) else parse_size_to_int(size)


def _entry(value) -> tuple[torch.dtype, tuple[int, ...]]:
    if isinstance(value, Ref):
        return value.out_dtype, value.shape
    if isinstance(value, Part):
        return value.source.entries()[value.key]
    return value.dtype, tuple(value.shape)


def plan_shards(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_size: int | str,
                weights_name: str = WEIGHTS_NAME) -> dict[str, list[str]]:
    """``{file name: tensor names}``, huggingface_hub's greedy split over the names in sorted order."""
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in sorted(entries):
        dtype, shape = entries[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > limit:
            shards.append([name])
            continue
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {weights_name: shards[0]}
    stem, suffix = weights_name.rsplit(".", 1)
    return {f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}": names for i, names in enumerate(shards, start=1)}


def write_folder(directory: str | os.PathLike, tensors: dict, max_shard_size: int | str = "5GB",
                 metadata: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Write ``tensors`` (values: tensors, :class:`Ref`, :class:`Part`) as sharded safetensors into
    ``directory``; returns the shard plan. Holds one tensor, or one derived group, at a time."""
    directory = Path(directory)
    metadata = {"format": "pt"} if metadata is None else metadata
    entries = {name: _entry(value) for name, value in tensors.items()}
    plan = plan_shards(entries, max_shard_size)
    shard_of = {name: file for file, names in plan.items() for name in names}
    writers = {file: StreamWriter(directory / file, {n: entries[n] for n in names}, metadata)
               for file, names in plan.items()}
    groups: dict[int, list[str]] = {}  # a derived source -> the names of its outputs
    for name, value in tensors.items():
        if isinstance(value, Part):
            groups.setdefault(id(value.source), []).append(name)
    try:
        for name, value in tensors.items():
            if isinstance(value, Part):
                names = groups.pop(id(value.source), None)
                if names is None:
                    continue  # written with the first output of its source
                computed = value.source.compute()
                for other in names:
                    writers[shard_of[other]].write(other, computed[tensors[other].key])
                del computed
            elif isinstance(value, Ref):
                writers[shard_of[name]].write_pieces(name, value.pieces())
            else:
                writers[shard_of[name]].write(name, value)
    finally:
        for writer in writers.values():
            writer.close()
    if len(plan) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in entries.values())
        index = {"metadata": {"total_size": total}, "weight_map": {name: shard_of[name] for name in sorted(shard_of)}}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return plan


def replace_tensors(directory: str | os.PathLike, tensors: dict, max_shard_size: int | str = "5GB",
                    metadata: dict[str, str] | None = None) -> None:
    """Replace the safetensors files (and index) of ``directory`` by ``tensors``, which may read
    from the files being replaced: the new ones are written aside first."""
    directory = Path(directory)
    aside = directory / ".hfcompress-tensors"
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    try:
        write_folder(aside, tensors, max_shard_size, metadata)
        for old in [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]:
            old.unlink()
        for new in aside.iterdir():
            new.rename(directory / new.name)
    finally:
        shutil.rmtree(aside, ignore_errors=True)
