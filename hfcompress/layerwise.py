"""Compressing a model larger than memory: weights stay on disk, one unit at a time comes in.

:func:`open_on_disk` builds the model empty (its parameters on the meta device, its computed
buffers such as rotary tables real) and attaches a :class:`DiskWeights` store that knows where
every tensor lies: first in the checkpoint's safetensors shards, then, for each unit a stage has
changed, in a spill file of its own. A *unit* is a decoder block, or a module outside the blocks
that holds weights (embedding table, final norm, output projection).

- The block-by-block loops hold one unit in memory while they work on it
  (:func:`hfcompress.residency.resident`); on leaving, the unit is written to the spill folder
  and its tensors go back to the meta device.
- Any other forward pass through the model (calibration probes, the first block's inputs) works
  too: a hook on each unit reads it just before its forward and drops it just after.
- :func:`save_on_disk` writes the result tensor by tensor from where each one lies, through the
  same conversion and the same shard writer as an in-memory ``save_pretrained``, so both give the
  same bytes.

Peak memory is then about one block, the calibration activations and the solver's statistics,
whatever the model's size. Pruning works here too (its importance pass walks the blocks as
calibration does, and each unit is cut while it is in memory). Stages that change the whole model
at once (rotate, distill, share, quantized embedding tables; dropping whole layers, Taylor
importance, expert pruning) need it in memory and are refused here with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import CompressionConfig, compression_record
from .errors import StageError, UserError
from .formats.shards import Ref, file_refs, write_folder
from .formats.stream_writer import StreamWriter
from .models import block_names
from .precision import all_finite
from .residency import STORE_ATTRIBUTE, store_of

logger = logging.getLogger(__name__)


class LayerwiseError(UserError):
    """The model or recipe cannot be compressed with its weights on disk."""


class DiskWeights:
    """Where each tensor of a model built on the meta device lies, and the loading of one unit."""

    def __init__(self, model: nn.Module, refs: dict[str, Ref], spill: Path):
        self.model = model
        self.where = dict(refs)  # state-dict name -> the file holding its current value
        # state-dict name -> the dtype the model holds it in between uses (a float32 checkpoint
        # loaded in bfloat16 holds bfloat16 values, also while a forward computes them in float32)
        self.rest = {name: tensor.dtype for name, tensor in model.state_dict(keep_vars=True).items()}
        self.spill = Path(spill)
        self.spill.mkdir(parents=True, exist_ok=True)
        self._spilled = 0
        self.blocks = block_names(model)
        inside = tuple(f"{name}." for name in self.blocks)
        self.units = list(self.blocks) + [
            name for name, module in model.named_modules()
            if name and not name.startswith(inside) and _own_tensors(module)]
        self._held: dict[str, int] = {}
        self._loaded: dict[str, list] = {}  # unit -> the (module, attribute, is parameter) slots it read
        self._hooked: dict[str, tuple[nn.Module, list]] = {}
        for unit in self.units:
            self._hook(unit)

    # -- which unit a module belongs to ------------------------------------------------------
    def unit_of(self, name: str) -> str:
        """The unit holding module ``name``: its block, or the longest unit naming it or above it."""
        candidates = [u for u in self.units if name == u or name.startswith(u + ".")]
        if not candidates:
            raise LayerwiseError(f"{name} lies in no unit of the on-disk model (it holds no weights)")
        return max(candidates, key=len)

    # -- hooks for whole-model forward passes -------------------------------------------------
    def _hook(self, unit: str) -> None:
        module = self.model.get_submodule(unit)
        if unit in self._hooked and self._hooked[unit][0] is module:
            return
        for handle in self._hooked.get(unit, (None, []))[1]:
            handle.remove()
        loaded_here: list[bool] = []

        def before(mod, args):
            if unit not in self._held and _has_meta(mod):
                self._load(unit)
                loaded_here.append(True)

        def after(mod, args, output):
            if loaded_here:
                loaded_here.pop()
                self._release(unit)

        handles = [module.register_forward_pre_hook(before),
                   module.register_forward_hook(after, always_call=True)]
        self._hooked[unit] = (module, handles)

    # -- holding a unit while a stage works on it ---------------------------------------------
    @contextlib.contextmanager
    def hold(self, unit: str):
        """Unit ``unit`` in memory inside the block; what it holds on leaving is spilled to disk
        and read from there from then on."""
        if unit not in self.units:
            unit = self.unit_of(unit)
        if self._held.get(unit):
            self._held[unit] += 1
            try:
                yield
            finally:
                self._held[unit] -= 1
            return
        self._load(unit)
        self._held[unit] = 1
        try:
            yield
            self._spill(unit)
        finally:
            del self._held[unit]
            self._release(unit)
            self._hook(unit)  # a stage may have replaced the module itself (lm_head by a packed one)

    def _slots(self, unit: str):
        """``(dotted name, owning module, attribute, is parameter)`` of the unit's persistent tensors."""
        module = self.model.get_submodule(unit)
        for prefix, child in module.named_modules(prefix=unit, remove_duplicate=False):
            for attr, tensor in child._parameters.items():
                if tensor is not None:
                    yield f"{prefix}.{attr}", child, attr, True
            for attr, tensor in child._buffers.items():
                if tensor is not None and attr not in child._non_persistent_buffers_set:
                    yield f"{prefix}.{attr}", child, attr, False

    def source(self, name: str, tensor: torch.Tensor) -> Ref:
        """Where the value of ``tensor`` (named ``name`` in the model) lies, read in its dtype (a
        float checkpoint may store it in another precision)."""
        ref = self.where.get(name)
        if ref is None:
            ref = next((self.where[other] for other, value in self.model.named_parameters(remove_duplicate=False)
                        if value is tensor and other in self.where), None)  # a tied alias
        if ref is None:
            raise LayerwiseError(f"{name}: not in the checkpoint; the model cannot be compressed from disk")
        if ref.stored.is_floating_point and tensor.is_floating_point() and ref.out_dtype != tensor.dtype:
            ref = dataclasses.replace(ref, dtype=tensor.dtype)
        return ref

    def alias(self, name: str, target: str) -> None:
        """``name`` now holds the tensor ``target`` names (a tie restored after ``target`` changed)."""
        if target in self.where:
            self.where[name] = self.where[target]

    @torch.inference_mode(False)  # ordinary tensors even while a forward reads them (see precision._raise)
    def _load(self, unit: str) -> None:
        loaded = self._loaded.setdefault(unit, [])
        for name, owner, attr, is_param in list(self._slots(unit)):
            current = (owner._parameters if is_param else owner._buffers)[attr]
            if not current.is_meta:
                continue  # loaded through a tied alias already
            ref = self.source(name, current)
            rest = self.rest.get(name, current.dtype)
            if ref.stored.is_floating_point and current.is_floating_point() and rest != current.dtype:
                # raised on the meta device to compute in float32 (precision.float32_forward): the
                # values it holds at rest, raised, as the model in memory would compute with
                tensor = dataclasses.replace(ref, dtype=rest).load().to(current.dtype)
            else:
                tensor = ref.load()  # in the model's dtype
            if is_param:
                self._swap(current, nn.Parameter(tensor, requires_grad=current.requires_grad))
            else:
                owner._buffers[attr] = tensor
            loaded.append((owner, attr, is_param))

    @torch.inference_mode(False)
    def _release(self, unit: str) -> None:
        """Every tensor of the unit back to the meta device: those it holds now, and those it was
        loaded with, also in modules a stage has since replaced (a stage's own lists of the layers
        it quantizes would otherwise keep every block's float weights alive)."""
        slots = [(owner, attr, is_param) for _, owner, attr, is_param in self._slots(unit)]
        for owner, attr, is_param in slots + self._loaded.pop(unit, []):
            current = (owner._parameters if is_param else owner._buffers).get(attr)
            if current is None or current.is_meta:
                continue
            empty = torch.empty(current.shape, dtype=current.dtype, device="meta")
            if is_param:
                empty = nn.Parameter(empty, requires_grad=current.requires_grad)
                self._swap(current, empty)
                owner._parameters[attr] = empty
            else:
                owner._buffers[attr] = empty
        _return_freed_memory()

    def _swap(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """Put ``new`` wherever ``old`` is held (tied weights are one object in several modules)."""
        for module in self.model.modules():
            for attr, value in module._parameters.items():
                if value is old:
                    module._parameters[attr] = new

    def _spill(self, unit: str) -> None:
        """Write the unit as it is now to a file of its own, which its names point to from now on."""
        tensors, aliases, seen = {}, {}, {}
        for name, owner, attr, is_param in self._slots(unit):
            tensor = (owner._parameters if is_param else owner._buffers)[attr]
            if id(tensor) in seen:
                aliases[name] = seen[id(tensor)]
                continue
            seen[id(tensor)] = name
            if tensor.is_floating_point() and not all_finite(tensor):  # the in-memory run's check, per unit
                raise StageError(f"{name} holds non-finite values (NaN or inf) after the stage; nothing was saved. "
                                 "Check the stage's numbers")
            tensors[name] = tensor.detach().to("cpu").contiguous()
        path = self.spill / f"{self._spilled:06d}.safetensors"
        self._spilled += 1
        # Streamed (save_file would first copy every tensor into a bytes object).
        with StreamWriter(path, {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}) as writer:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        refs = file_refs([path])
        self.rest.update({name: ref.stored for name, ref in refs.items()})
        self.rest.update({name: refs[target].stored for name, target in aliases.items()})
        self.where.update(refs)
        self.where.update({name: refs[target] for name, target in aliases.items()})


def _allocate_large_from_the_system() -> None:
    """Blocks of 8 MB and more straight from the system (mmap), back to it when freed. glibc's
    default raises that threshold to the size of the largest block freed so far (up to 32 MB),
    after which a block's weights and activations come from its heap, which fragments and keeps
    what every block used; a model on disk is read one block at a time precisely to avoid that."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD (fixed: no dynamic raise)
    except (OSError, AttributeError):  # not glibc
        pass


def _return_freed_memory() -> None:
    """Hand the freed heap back to the system (glibc keeps freed blocks of a few MB in its arenas,
    which would make every block read so far count in the process's memory)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator returns memory its own way
        pass


def _own_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in module._parameters.values()) or any(
        t is not None and k not in module._non_persistent_buffers_set for k, t in module._buffers.items())


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


# Stages that work block by block through `resident` (everything else needs the whole model).
LAYERWISE_STAGES = ("prune", "quantize")


def check_recipe(recipe) -> None:
    """Refuse, before any work, what cannot run with the weights on disk."""
    for i, stage in enumerate(recipe.stages):
        where = f"recipe stages[{i}].{stage.name}"
        if stage.name not in LAYERWISE_STAGES:
            raise LayerwiseError(f"{where}: this stage changes the whole model at once and needs it in memory; "
                                 "layer-wise compression runs prune and quantize stages (drop --layerwise for the "
                                 "others)")
        if stage.name == "prune":
            _check_prune(stage, where)
        elif stage.embeddings is not None:
            raise LayerwiseError(f"{where}.embeddings: a quantized embedding table is not written layer by layer yet; "
                                 "drop the embeddings key or --layerwise")


def _check_prune(stage, where: str) -> None:
    if stage.importance == "taylor":
        raise LayerwiseError(f"{where}.importance: taylor backpropagates through the whole model at once; use "
                             "activation or magnitude importance with --layerwise (or drop --layerwise)")
    if stage.layers:
        raise LayerwiseError(f"{where}.layers: dropping whole layers renumbers the blocks on disk, which layer-wise "
                             "runs do not do yet; prune heads, ffn and hidden channels here, or drop --layerwise")
    if stage.experts:
        raise LayerwiseError(f"{where}.experts: expert pruning is not layer-wise yet; drop --layerwise for it")


def _resolve_dtype(dtype, config, refs: dict[str, Ref]) -> torch.dtype:
    """The dtype ``from_pretrained`` would give the model: ``dtype``, or for "auto" the config's,
    else the checkpoint's first floating tensor's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        return getattr(torch, dtype)
    stated = getattr(config, "dtype", None)
    if isinstance(stated, str):
        stated = getattr(torch, stated, None)
    if isinstance(stated, torch.dtype):
        return stated
    return next((ref.stored for ref in refs.values() if ref.stored.is_floating_point), torch.float32)


def open_on_disk(folder: str | os.PathLike, model_class, *, dtype="auto", spill: str | os.PathLike,
                 trust_remote_code: bool = False) -> nn.Module:
    """``model_class`` (an Auto class or a model class) built empty for the safetensors checkpoint
    in ``folder``, its weights read from there unit by unit (see the module doc)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    from .formats.checkpoint import loaded_names
    from .formats.folder import safetensors_files

    folder = Path(folder)
    refs = file_refs(safetensors_files(folder))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    dtype = _resolve_dtype(dtype, config, refs)
    with init_empty_weights(include_buffers=False):  # computed buffers (rotary tables) stay real
        model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_pretrained ties after loading; tied tables are one parameter from here on
    model.eval()
    if (folder / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    renamed = {k: v for k, v in loaded_names(model, refs).items() if k != v}
    if renamed:
        first = next(iter(renamed.items()))
        raise LayerwiseError(f"{type(model).__name__} renames checkpoint tensors on load (e.g. {first[1]} -> {first[0]}); "
                             "layer-wise compression reads checkpoints stored under the model's own names: drop --layerwise")
    expected = model.state_dict()
    missing = [name for name, tensor in expected.items() if name not in refs and not _tied(model, name)]
    wrong = [name for name, tensor in expected.items() if name in refs and tuple(tensor.shape) != refs[name].shape]
    if missing or wrong:
        what = f"missing {missing[0]}" if missing else f"{wrong[0]} has shape {list(refs[wrong[0]].shape)}"
        raise LayerwiseError(f"{folder}: the checkpoint does not match {type(model).__name__} ({what}); "
                             "it cannot be read layer by layer")
    _allocate_large_from_the_system()
    model.__dict__[STORE_ATTRIBUTE] = DiskWeights(model, refs, Path(spill))
    logger.info("layer-wise: %s built empty; its %d tensors are read from %s one unit at a time",
                type(model).__name__, len(refs), folder)
    return model


def _tied(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` is another parameter under a second name (tied embeddings)."""
    try:
        tensor = model.get_parameter(name)
    except AttributeError:
        return False
    return any(value is tensor and other != name for other, value in model.named_parameters(remove_duplicate=False))


def save_on_disk(model: nn.Module, directory: str | os.PathLike, save_format: str = "auto",
                 max_shard_size: int | str = "5GB") -> str:
    """Save a model compressed with its weights on disk into ``directory`` as ``save_pretrained``
    does for one in memory (the same files, byte for byte); returns the format written."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from .card import write_model_card
    from .formats.save import finish_save

    store = store_of(model)
    directory = Path(directory)
    state = remove_tied_weights_from_state_dict(model.state_dict(keep_vars=True), model)
    tensors = {name: store.source(name, tensor) for name, tensor in state.items()}
    metadata = {"format": "pt"}
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        metadata.update(quantizer.get_state_dict_and_metadata(model)[1] or {})
    # What save_pretrained writes besides the tensors, as it writes it.
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    write_folder(directory, tensors, max_shard_size, metadata)
    compressed = isinstance(getattr(model.config, "quantization_config", None), CompressionConfig)
    saved = finish_save(directory, save_format, max_shard_size) if compressed else "plain"
    model.hfcompress_saved_format = saved
    if compressed or compression_record(model) is not None:
        write_model_card(model, directory)
    return saved
