"""Decoder layers that share weights: groups, initialization, relaxed sharing, storage, reload.

Sharing is by module: after ``share_layers`` the layers of a group hold the *same* linear module
objects for the shared parts (attention: the query/key/value and output projections; mlp: the
FFN projections). Norms stay per layer (they are tiny and cheap to keep). Module identity is what
makes everything downstream work without special cases: the optimizer sees each parameter once,
gradients from every user add up, and a stage that replaces a module (quantization) replaces it
for all users at once through :func:`tie_shared_modules`.

With ``lora_rank > 0`` every user wraps the shared module in :class:`SharedLinearDelta`, adding a
low-rank correction of its own that starts at zero (relaxed sharing, as in the Relaxed Recursive
Transformers paper): the shared weights stay shared and quantizable, the deltas stay in float.

Storage: the config records a :class:`~hfcompress.config.SharedRecord` ``{user: owner}`` (``owner``
is the first layer of the group), ``save_pretrained`` writes the owner's tensors only (the users'
names go into the model's ``_keys_to_ignore_on_save``), and on load the users are pointed at the
owner's modules again after the weights are in.
"""

from __future__ import annotations

import copy
import logging
import re
from itertools import chain

import torch
from torch import nn

from ..config import LoraRecord, SharedRecord
from ..errors import CheckpointError, UserError
from ..models import LINEAR_TYPES, ArchitectureError, decoder_blocks, linear_shape, linear_weight
from ..models.layout import common_layout

logger = logging.getLogger(__name__)


class SharingError(UserError, ValueError):
    """A sharing request that cannot be carried out (groups, shapes, order of stages, family)."""


class SharedLinearDelta(nn.Module):
    """``base(x) + x A^T B^T``: a shared linear layer plus this layer's own low-rank correction.

    ``B`` starts at zero, so wrapping changes nothing until training moves it. ``A`` and ``B`` are
    plain parameters rather than linear modules, so quantization leaves them in float.
    """

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        in_features, out_features = linear_shape(base)
        weight = linear_weight(base)
        self.base = base
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=weight.dtype, device=weight.device))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)  # LoRA's initialization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = nn.functional.linear(nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + delta.to(x.dtype)


def _parts_paths(model: nn.Module, parts: list[str]) -> list[str]:
    """Block-relative paths of the linear layers that make up ``parts``, read by the model registry."""
    try:
        layout = common_layout(model)
    except ArchitectureError as err:
        raise SharingError(f"cross-layer sharing: {err}") from None
    paths = []
    if "attention" in parts:
        paths += list(layout.attention.projections)
    if "mlp" in parts:
        paths += list(layout.mlp.projections)
    return paths


def _blocks_prefix(model: nn.Module, blocks: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is blocks)


def check_groups(groups: list[list[int]], n_layers: int) -> None:
    """Every layer the groups name exists in a model of ``n_layers`` decoder layers. (That groups
    have two or more layers and do not overlap is the recipe's check: ``ShareStage.validate``.)"""
    for group in groups:
        for layer in group:
            if not 0 <= layer < n_layers:
                raise SharingError(f"share layers: layer {layer} does not exist; the model has {n_layers} decoder "
                                   f"layers (0 to {n_layers - 1})")


def groups_of(every: int, n_layers: int) -> list[list[int]]:
    """``every`` adjacent layers per group; a shorter rest of two or more is a group too, one is left alone."""
    groups = [list(range(start, min(start + every, n_layers))) for start in range(0, n_layers, every)]
    return [g for g in groups if len(g) > 1]


@torch.no_grad()
def share_layers(model: nn.Module, groups: list[list[int]], parts: list[str], init: str | int = "mean",
                 lora_rank: int = 0) -> SharedRecord:
    """Make each group of decoder layers share ``parts``; return the record for the config."""
    blocks = decoder_blocks(model)
    check_groups(groups, len(blocks))
    prefix = _blocks_prefix(model, blocks)
    paths = _parts_paths(model, parts)
    modules_map: dict[str, str] = {}
    wrappers: list[str] = []
    for group in groups:
        if isinstance(init, int) and init >= len(group):
            raise SharingError(f"share init: position {init} does not exist in group {group} ({len(group)} members)")
        for path in paths:
            members = [blocks[i].get_submodule(path) for i in group]
            for layer, module in zip(group, members):
                if isinstance(module, SharedLinearDelta) or not isinstance(module, LINEAR_TYPES):
                    what = "already shared" if isinstance(module, SharedLinearDelta) else f"a {type(module).__name__}"
                    raise SharingError(f"share layers: layer {layer}'s {path} is {what}; share float linear layers, "
                                       "before quantize and before another share of the same part")
            if len({id(m) for m in members}) < len(members):
                raise SharingError(f"share layers: {path} of layers {group} is already shared")
            shapes = [(linear_shape(m), m.bias is not None) for m in members]
            if len(set(shapes)) > 1:
                detail = ", ".join(f"layer {layer}: {shape[0][0]}->{shape[0][1]}" for layer, shape in zip(group, shapes))
                raise SharingError(f"share layers: {path} differs in shape across group {group} ({detail}); layers "
                                   "pruned to different sizes cannot share weights")
            shared = _initial_module(members, init)
            owner = f"{prefix}.{group[0]}.{path}"
            for layer in group:
                name = f"{prefix}.{layer}.{path}"
                module = shared
                if lora_rank:
                    module = SharedLinearDelta(shared, lora_rank)
                    wrappers.append(name)
                    name += ".base"
                blocks[layer].set_submodule(path, module)
                if layer != group[0]:
                    modules_map[name] = owner + (".base" if lora_rank else "")
    logger.info("share: %d groups of layers share %s (%d modules each stored once%s)", len(groups),
                " and ".join(parts), len(modules_map), f", rank-{lora_rank} corrections per layer" if lora_rank else "")
    return SharedRecord(modules_map, LoraRecord(lora_rank, wrappers) if lora_rank else None)


def _initial_module(members: list[nn.Module], init: str | int) -> nn.Module:
    """The group's shared module: a copy of one member, or of the first with the members' mean."""
    if isinstance(init, int):
        return copy.deepcopy(members[init])
    shared = copy.deepcopy(members[0])
    for name in ("weight", "bias"):
        tensor = getattr(shared, name, None)
        if tensor is not None:
            mean = torch.stack([getattr(m, name).detach().float() for m in members]).mean(0)
            tensor.copy_(mean.to(tensor.dtype))
    return shared


def merge_records(old: SharedRecord | None, new: SharedRecord) -> SharedRecord:
    """The config record after another share stage."""
    if not old:
        return new
    lora = [r.lora for r in (old, new) if r.lora]
    if len({r.rank for r in lora}) > 1:
        raise SharingError("share: two share stages with different lora_rank values; use one rank")
    merged_lora = LoraRecord(lora[0].rank, [m for r in lora for m in r.modules]) if lora else None
    return SharedRecord({**old.modules, **new.modules}, merged_lora)


def tie_shared_modules(model: nn.Module, record: SharedRecord | None) -> None:
    """Point every user at its owner's module (after a stage replaced the owner, or after loading)."""
    if not record:
        return
    for user, owner in record.modules.items():
        model.set_submodule(user, model.get_submodule(owner))
    register_shared_tensors(model)


def rebuild_shared_structure(model: nn.Module, record: SharedRecord | None) -> None:
    """Before the weights load: the relaxed-sharing wrappers, and tell transformers that the users'
    tensors are not in the file (they are tied to the owners' after loading)."""
    if not record:
        return
    lora = record.lora
    for name in lora.modules if lora else []:
        base = _stored_module(model, name, "shared.lora.modules")
        try:
            width = min(linear_shape(base))
        except (AttributeError, TypeError):
            raise CheckpointError(f"config.json quantization_config.shared.lora names {name!r}, which is not a "
                                  f"linear layer of {type(model).__name__}: the config does not belong to this model") from None
        if lora.rank > width:
            raise CheckpointError(f"config.json quantization_config.shared.lora.rank is {lora.rank}, more than "
                                  f"{name}'s smaller side ({width}): the config is corrupt or was edited")
        model.set_submodule(name, SharedLinearDelta(base, lora.rank))
    for user, owner in record.modules.items():
        _check_same_shapes(model, user, owner)
    patterns = {rf"^{re.escape(user)}\." for user in record.modules}
    model._keys_to_ignore_on_load_missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ()) | patterns


def _stored_module(model: nn.Module, name: str, field: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"config.json quantization_config.{field} names {name!r}, which "
                              f"{type(model).__name__} does not have: the config does not belong to this model") from None


def _check_same_shapes(model: nn.Module, user: str, owner: str) -> None:
    """A user takes its owner's module after loading: both must be the same kind and shape."""
    used, owned = (_stored_module(model, name, "shared.modules") for name in (user, owner))

    def shapes(module: nn.Module) -> dict:
        return {k: tuple(t.shape) for k, t in chain(module.named_parameters(), module.named_buffers())}

    if type(used) is not type(owned) or shapes(used) != shapes(owned):
        raise CheckpointError(f"config.json quantization_config.shared.modules: {user} cannot share {owner}'s "
                              "weights (a different kind or shape of layer): the config is corrupt or was edited")


def shared_tensor_names(model: nn.Module) -> dict[str, str]:
    """``{state-dict name of a repeated use of a shared module's tensor: the name it is stored under}``."""
    owners: dict[int, str] = {}
    repeated: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        owner = owners.setdefault(id(module), name)
        if owner == name:
            continue
        tensors = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
        for tensor_name, _ in tensors:
            repeated[f"{name}.{tensor_name}"] = f"{owner}.{tensor_name}"
    return repeated


def register_shared_tensors(model: nn.Module) -> dict[str, str]:
    """Make ``save_pretrained`` write each shared tensor once, under its owner's name."""
    repeated = shared_tensor_names(model)
    previous = getattr(model, "_hfcompress_shared_keys", set())
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) - previous
    model._keys_to_ignore_on_save = ignore | set(repeated)
    model._hfcompress_shared_keys = set(repeated)
    return repeated
