"""Linear layers across families, seen one way: ``[out, in]``.

Linear layers come in two shapes: ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D``
(weight ``[in, out]``). This is the only file that knows the difference: everything else in
hfcompress reads, slices and rebuilds linear layers through the functions here.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
>>> list(find_linear_layers(net))
['0', '2']
>>> list(find_linear_layers(net, ignore=["2"]))
['0']
>>> keep_outputs(net[0], torch.tensor([0, 2])); linear_shape(net[0])
(4, 2)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..patterns import matches  # noqa: F401  (part of this module's interface)

logger = logging.getLogger(__name__)

LINEAR_TYPES = (nn.Linear, Conv1D)


# nn.Linear subclasses whose own forward still computes x @ W^T + b, so that a packed linear can
# stand in for them. Any other subclass that overrides forward (DeepSeek-V4's grouped linear,
# Llama 4's router) multiplies its weight its own way: its weight is a raw weight (see raw_weights).
PLAIN_LINEAR_SUBCLASSES = {"FalconLinear"}


def is_linear(module: nn.Module) -> bool:
    """A float linear layer (``nn.Linear`` or ``Conv1D``), not a packed one."""
    if not isinstance(module, LINEAR_TYPES):
        return False
    cls = type(module)
    return (isinstance(module, Conv1D) or cls.forward is nn.Linear.forward
            or cls.__name__ in PLAIN_LINEAR_SUBCLASSES)


def is_linear_like(module: nn.Module) -> bool:
    """A float or packed linear layer: anything with integer ``in_features``/``out_features`` and
    a weight (``QuantLinear`` stores ``qweight``)."""
    if is_linear(module):
        return True
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and (hasattr(module, "qweight") or isinstance(getattr(module, "weight", None), torch.Tensor)))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a float linear layer, or of anything that declares them
    (a packed ``QuantLinear``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; ``Conv1D`` is transposed)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def weight_shape(module: nn.Module, in_features: int, out_features: int) -> tuple[int, int]:
    """The stored weight shape a layer like ``module`` has with these sizes."""
    return (in_features, out_features) if isinstance(module, Conv1D) else (out_features, in_features)


def linear_weight_grad(module: nn.Module) -> torch.Tensor:
    """The gradient of a linear layer's weight as ``[out, in]``."""
    grad = module.weight.grad
    if grad is None:
        raise ValueError(f"{type(module).__name__} received no gradient: is it used by the forward pass?")
    return grad.t() if isinstance(module, Conv1D) else grad


# Parameter names that are not weight matrices even when 2-D or more: biases, norm scales, state
# space constants (Mamba's A_log, D), attention sinks, embeddings, convolution kernels.
_NOT_WEIGHTS = re.compile(r"bias|norm|scale|^a(_log)?$|^d$|sink|conv|emb|^pos", re.IGNORECASE)


def raw_weights(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{dotted name: parameter}``: the weight matrices inside ``module`` that no linear layer
    holds, which the model multiplies itself (3-D experts of DBRX, JetMoE, Llama 4; XLNet's
    einsum projections; Zamba's per-head Mamba projections; grouped linears).

    A weight here has two or more dimensions, and neither it nor its owner is a bias, a norm, an
    embedding, a convolution or a state-space constant.
    """
    found = {}
    for path, owner in module.named_modules():
        if is_linear_like(owner) and not _overrides_forward(owner):
            continue
        if isinstance(owner, (nn.Embedding, nn.modules.conv._ConvNd)) or "norm" in type(owner).__name__.lower():
            continue
        if any("norm" in part.lower() for part in path.split(".")):
            continue
        for pname, param in owner.named_parameters(recurse=False):
            if param.dim() < 2 or _NOT_WEIGHTS.search(pname) or min(param.shape[-1], param.numel() // param.shape[-1]) < 2:
                continue
            name = ".".join(p for p in (prefix, path, pname) if p)
            found[name] = param
    return found


def _overrides_forward(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not is_linear(module)


def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def keep_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep output features ``index`` of a float linear layer (weight rows, bias entries)."""
    index = index.to(module.weight.device)
    if isinstance(module, Conv1D):
        _replace_parameter(module, "weight", module.weight.detach()[:, index])
        module.nf = len(index)
    else:
        _replace_parameter(module, "weight", module.weight.detach()[index])
        module.out_features = len(index)
    if module.bias is not None:
        _replace_parameter(module, "bias", module.bias.detach()[index])


def keep_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep input features ``index`` of a float linear layer."""
    index = index.to(module.weight.device)
    if isinstance(module, Conv1D):
        _replace_parameter(module, "weight", module.weight.detach()[index])
    else:
        _replace_parameter(module, "weight", module.weight.detach()[:, index])
        module.in_features = len(index)


def resize_linear(module: nn.Module, in_features: int, out_features: int) -> nn.Module:
    """An empty float layer like ``module`` with new sizes, on the same device and dtype (for reloads)."""
    weight = module.weight
    bias = module.bias is not None
    with torch.device(weight.device):
        if isinstance(module, Conv1D):
            new = Conv1D(out_features, in_features)
            if not bias:
                new.bias = None
        else:
            new = nn.Linear(in_features, out_features, bias=bias)
    return new.to(weight.dtype)


def model_configs(model: nn.Module) -> list:
    """The model's config and, for multimodal models, its text config (each once): where sizes live."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return list({id(c): c for c in (config, text)}.values())


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce the logits (``lm_head``), if the model has one."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        head = None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_linear_layers(
    model: nn.Module, ignore: Iterable[str] = (), include_lm_head: bool = False, within: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """Float linear layers to compress, in module order; ``lm_head`` only when asked.

    ``within``: module-name prefixes to search under (the language model of a multimodal model);
    ``None`` searches the whole model. Embeddings are never returned (they are not linear
    layers). Patterns in ``ignore`` that match nothing are reported in the log, since they are
    usually typos.
    """
    ignore = list(ignore)
    heads = output_embedding_names(model)
    prefixes = None if within is None else tuple(within)
    found = {}
    all_names = []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        all_names.append(name)
        if name in heads:
            inside = include_lm_head
        else:
            inside = prefixes is None or any(name == p or name.startswith(p + ".") for p in prefixes)
        if inside and not matches(name, ignore):
            found[name] = module
    for pattern in ignore:
        if not any(matches(name, [pattern]) for name in all_names):
            logger.warning("ignore pattern %r matches no linear layer of %s", pattern, type(model).__name__)
    return found
