"""Back to float: the packed modules of a compressed model as the float modules the family builds.

``model.dequantize()`` (transformers' API) lands here. Each module named in the record becomes the
module the model's own class puts at that place (``nn.Linear``, GPT-2's ``Conv1D``, an embedding
table, a raw weight parameter again), holding the dequantized weight: the float model computes
what the packed one did, up to the kernels' summation order. A tied embedding table unties into
the embedding and an ``lm_head`` that share one matrix again, as transformers ties them.

:func:`packed_parameter_count` is what ``num_parameters()`` adds for packed modules, whose
weights are integer buffers rather than parameters.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import CompressionConfig
from ..errors import UserError
from ..sharing.embeddings import tie_embeddings
from ..sharing.layers import SharedLinearDelta, tie_shared_modules
from .embedding import QuantEmbedding
from .packed_tensor import SUFFIX as PACKED_SUFFIX
from .packed_tensor import unpack_parameter
from .qlinear import QuantLinear

logger = logging.getLogger(__name__)


def packed_parameter_count(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Parameters the packed modules of ``model`` stand for (weights and biases; each shared module
    once): what ``num_parameters()`` would count had they stayed float."""
    total = 0
    for module in model.modules():  # each module object once, however many layers use it
        if isinstance(module, QuantLinear) and not (exclude_embeddings and isinstance(module, QuantEmbedding)):
            total += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
    return total


def _float_skeleton(model: nn.Module) -> nn.Module:
    """The model's class built from its config on the meta device: the float modules, no memory."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return type(model)._from_config(config)


def _float_module(proto: nn.Module, packed: QuantLinear, dtype: torch.dtype) -> nn.Module:
    """``proto`` (a meta module) made real on ``packed``'s device, holding ``packed``'s weight."""
    device = packed.qweight.device
    module = copy.deepcopy(proto).to_empty(device=device)
    weight = packed.dequantize_weight().to(dtype)  # [N, K]
    with torch.no_grad():
        module.weight.copy_(weight.t() if isinstance(module, Conv1D) else weight)
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(packed.bias if packed.bias is not None else torch.zeros_like(module.bias))
    for name, buffer in list(module.named_buffers(recurse=False)):
        # Buffers the family computes at init (Gemma's embedding scale) were lost on the meta device.
        kept = getattr(packed, name, None)
        if isinstance(kept, torch.Tensor):
            setattr(module, name, kept.to(buffer.dtype))
    return module


def _packed_name(model: nn.Module, name: str) -> str:
    """Where the packed module recorded as ``name`` is now: inside an adapter wrapper (peft's
    ``base_layer``) when one was put around it."""
    module = model.get_submodule(name)
    while not isinstance(module, QuantLinear) and isinstance(getattr(module, "base_layer", None), nn.Module):
        name, module = f"{name}.base_layer", module.base_layer
    return name


def _skeleton_name(model: nn.Module, name: str) -> str:
    """Where the float model has the module ``name``: a relaxed-sharing wrapper's ``base`` is the
    layer the wrapper replaced."""
    parent, _, last = name.rpartition(".")
    if last == "base" and isinstance(model.get_submodule(parent), SharedLinearDelta):
        return parent
    return name


def _dtype(value, model: nn.Module) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value, None)
    if isinstance(value, torch.dtype):
        return value
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.float32


@torch.no_grad()
def dequantize_model(model: nn.Module, config: CompressionConfig, dtype: torch.dtype | str | None = None) -> None:
    """Replace every packed module in ``config.modules`` by its float module, in ``dtype`` (default:
    the model's float parameters' dtype), and empty ``config.modules``. The pruned and shared
    records stay: they describe the float model as well."""
    dtype = _dtype(dtype, model)
    skeleton = _float_skeleton(model)
    skeleton_names = dict(skeleton.named_modules(remove_duplicate=False))
    head_of = {user: owner for user, owner in (config.shared.modules if config.shared else {}).items()
               if isinstance(model.get_submodule(owner), QuantEmbedding)}
    for name in list(config.modules):
        if name.endswith(PACKED_SUFFIX):
            owner, _, pname = name.removesuffix(PACKED_SUFFIX).rpartition(".")
            unpack_parameter(model.get_submodule(owner), pname)
            continue
        proto = skeleton_names.get(_skeleton_name(model, name))
        name = _packed_name(model, name)
        packed = model.get_submodule(name)
        if proto is None:
            raise UserError(f"dequantize: {name} has no float counterpart in {type(model).__name__} (experts "
                            "unfused to be quantized cannot be fused back yet); compress the original checkpoint "
                            "with another recipe instead")
        model.set_submodule(name, _float_module(proto, packed, dtype))
    for user in head_of:
        # The lm_head that used the packed table: a float head again, tied to the float table.
        model.set_submodule(user, copy.deepcopy(skeleton_names[user]).to_empty(device=model.get_submodule(
            head_of[user]).weight.device))
        del config.shared.modules[user]
        tie_embeddings(model, "input")
    if config.shared is not None and not config.shared.modules and config.shared.lora is None:
        config.shared = None
    config.modules = {}
    tie_shared_modules(model, config.shared)  # users of a shared module take its float replacement
    logger.info("dequantized to %s", str(dtype).removeprefix("torch."))
