"""Weights that are not linear layers, stored packed and read back dequantized.

Some models multiply weight tensors themselves instead of calling a linear layer: DBRX, JetMoE,
Llama 4 and LongCat keep their experts as 3-D parameters with their own loops or batched matmuls,
XLNet projects with ``einsum``, Zamba's Mamba holds per-head projection tensors, DeepSeek-V4 has a
grouped linear. A :class:`PackedTensor` stores such a tensor in the packed linear layout (its rows
are every index but the last, flattened; its groups run along the last dimension), and
:func:`pack_parameter` puts it in the parameter's place: the owner's class gains a lookup that
serves the packed tensor (its child ``<name>_packed``), dequantized, wherever its code reads
``self.<name>``. The model's own
code then runs unchanged, on the dequantized weight (a dequantize-then-multiply path, like the
reference path of :class:`~hfcompress.quantization.qlinear.QuantLinear`).

These tensors are quantized by rounding (RTN): GPTQ needs the inputs of a linear layer, which a
tensor multiplied inside model code does not expose.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .qlinear import LinearFormat, QuantLinear
from .rtn import quantize_rtn

__all__ = ["SUFFIX", "PackedTensor", "empty_packed_parameter", "pack_parameter", "packed_owner_class",
           "unpack_parameter"]


class PackedTensor(QuantLinear):
    """A packed weight tensor of any shape (two or more dimensions)."""

    def __init__(self, shape: tuple[int, ...], fmt: LinearFormat, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__(shape[-1], math.prod(shape[:-1]), fmt, device=device)
        self.shape = tuple(shape)
        # Follows the model's dtype through .to(), so the tensor comes back in the dtype the
        # parameter would have had (packed buffers are integers and stay as they are).
        self.register_buffer("dtype_probe", torch.zeros((), dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_codes(cls, quantized, fmt: LinearFormat, shape: tuple[int, ...], dtype: torch.dtype) -> PackedTensor:
        """Pack a :class:`QuantizedWeight` of the tensor viewed as ``[rows, shape[-1]]``."""
        packed = cls(shape, fmt, dtype, device=quantized.q.device)
        source = QuantLinear.from_quantized(quantized, None, fmt)
        for key in ("qweight", "qzeros", "scales"):
            getattr(packed, key).copy_(getattr(source, key))
        return packed

    def tensor(self) -> torch.Tensor:
        """The dequantized weight, in the parameter's shape and the model's dtype."""
        return self.dequantize_weight().reshape(self.shape).to(self.dtype_probe.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("a PackedTensor is a weight read by its owner's code, not a layer to call")

    def extra_repr(self) -> str:
        return f"shape={self.shape}, " + super().extra_repr()


# The packed tensor of ``owner.<name>`` is the child module ``<name>_packed``.
SUFFIX = "_packed"

_OWNER_CLASSES: dict[type, type] = {}


def packed_owner_class(cls: type) -> type:
    """``cls`` with attribute lookup that serves its :class:`PackedTensor` children as tensors."""
    if cls in _OWNER_CLASSES.values():
        return cls
    if cls in _OWNER_CLASSES:
        return _OWNER_CLASSES[cls]

    def __getattr__(self, name):
        packed = self.__dict__["_modules"].get(name + SUFFIX)
        return packed.tensor() if packed is not None else super(owner, self).__getattr__(name)

    # Same name, module and qualified name: transformers and reprs that look at the class see the
    # model's own; isinstance holds too.
    owner = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})
    _OWNER_CLASSES[cls] = owner
    return owner


def _install(owner: nn.Module, name: str, packed: PackedTensor) -> None:
    del owner._parameters[name]
    owner.__class__ = packed_owner_class(type(owner))
    owner.add_module(name + SUFFIX, packed)


def pack_parameter(owner: nn.Module, name: str, fmt: LinearFormat) -> PackedTensor:
    """Round ``owner.<name>`` to ``fmt`` (RTN) and put the packed tensor in its place."""
    param = owner._parameters[name]
    shape = tuple(param.shape)
    weight = param.detach().float().reshape(-1, shape[-1])
    quantized = quantize_rtn(weight, fmt.bits, fmt.group_size, fmt.sym, fmt.torch_scale_dtype)
    packed = PackedTensor.from_codes(quantized, fmt, shape, param.dtype)
    _install(owner, name, packed)
    return packed


def empty_packed_parameter(owner: nn.Module, name: str, fmt: LinearFormat) -> PackedTensor:
    """An empty packed tensor in the place of ``owner.<name>``, for a checkpoint to load into."""
    param = owner._parameters[name]
    packed = PackedTensor(tuple(param.shape), fmt, param.dtype, device=param.device)
    _install(owner, name, packed)
    return packed


def unpack_parameter(owner: nn.Module, name: str) -> None:
    """The inverse of :func:`pack_parameter`: ``owner.<name>`` a float parameter again, dequantized."""
    packed = owner._modules.pop(name + SUFFIX)
    owner.register_parameter(name, nn.Parameter(packed.tensor(), requires_grad=True))
    if type(owner) in _OWNER_CLASSES.values() and not any(isinstance(c, PackedTensor) for c in owner.children()):
        owner.__class__ = type(owner).__mro__[1]  # the model's own class again (see packed_owner_class)
