"""QuantLinear: a Linear layer whose weight is stored packed, in the GPTQ layout.

Buffers (``K = in_features``, ``N = out_features``, ``G = n_groups``; layout in ``pack.py``):

======== ======================================= ==================================================
name     dtype / shape                           meaning
======== ======================================= ==================================================
qweight  int32 ``[ceil(K*bits/32), N]``          codes, packed along K
qzeros   int32 ``[G, ceil(N*bits/32)]``          integer zero points, packed along N (stored as is,
                                                 not minus one as GPTQ v1 exports do)
scales   ``scale_dtype`` ``[G, N]``              one scale per group and output channel
g_idx    int32 ``[K]`` (act-order only)          group of each input column
bias     model dtype ``[N]`` (when the original
         layer had one)
======== ======================================= ==================================================

The forward pass picks a kernel by the device of its input (``dispatch.py``): the Triton kernels
on CUDA, torch's packed int4/int8 matmuls on CPU, else the reference path here (unpack,
dequantize, matmul), which every kernel is tested against. Kernels repack the buffers once, on
the first forward on a device (or :func:`prepare_kernels`), never on disk.

>>> import torch
>>> from hfcompress.quantization.rtn import quantize_rtn
>>> linear = torch.nn.Linear(100, 24)
>>> fmt = LinearFormat(bits=4, group_size=32, sym=False)
>>> qlinear = QuantLinear.from_quantized(quantize_rtn(linear.weight, 4, 32, False), linear.bias, fmt)
>>> qlinear(torch.randn(3, 100)).shape
torch.Size([3, 24])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import native_precision
from . import dispatch
from .grid import QuantizedWeight, group_count, group_index
from ..linear_format import LinearFormat
from .pack import pack_columns, pack_rows, packed_length, unpack_columns, unpack_rows

# While a layer's scales train (``trainable.py``): the parameters beside the stored buffers.
TRAINABLE_SCALES = "log_scales"  # float32 log of the scales: a step of the optimizer is a relative change
TRAINABLE_ZEROS = "float_zeros"  # float32 zero points of an asymmetric layer, rounded in the forward pass
TRAINABLE_CODES = "code_offsets"  # float32 [N, K] o: each code moves CODE_GAIN * o grid steps, one at most
# The code offsets share the scales' learning rate (one Trainer, one schedule) but need larger
# steps: a scale's step is relative (1e-3 of itself), while a code moves only once its offset has
# gathered half a grid step. At 20x, a run of ~100 steps at lr 1e-3 (cosine) can gather about one
# step in all: a code moves only where the gradient keeps one sign for most of the run. At 50x
# (block tuning's CODE_LR of 0.05 per step) the codes with a steady sign all crossed together
# after about 15 steps, and end-to-end training on SmolLM2 3-bit fell apart (forward KL
# 0.18 -> 0.75 by step 28).
CODE_GAIN = 20.0


class _PackedMatmul(torch.autograd.Function):
    """``y = x @ dequant(W)^T + b`` through the fastest kernel, differentiable with respect to ``x``.

    The packed weight (and bias) stay frozen. No kernel has a derivative of its own (torch's CPU
    int4 matmul has none), and autograd through the reference path would keep each layer's
    dequantized float weight alive until the backward pass: a float copy of the whole model. So
    the backward dequantizes ``W`` again, uses it for ``dL/dx = dL/dy @ W`` and drops it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
        ctx.module = module
        with torch.no_grad():
            return module._forward_packed(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.module.dequantize_weight()  # float32
        if native_precision(grad.dtype, grad.device):
            return grad @ weight.to(grad.dtype), None
        # Emulated bfloat16/float16 matmuls (a CPU without those instructions) are several times
        # slower than float32, and the weight is float32 already.
        return (grad.float() @ weight).to(grad.dtype), None


def _group_sum(t: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """``[G, N]``: the sum of ``t`` ``[N, K]`` over the columns of each group."""
    n, k = t.shape
    n_groups = weight.scales.shape[0]
    if torch.equal(weight.g_idx, group_index(k, weight.group_size, weight.g_idx.device)):
        span = k if weight.group_size == -1 else weight.group_size
        return F.pad(t, (0, n_groups * span - k)).view(n, n_groups, span).sum(-1).t()
    return torch.zeros(n_groups, n, dtype=t.dtype, device=t.device).index_add_(0, weight.g_idx.long(), t.t())


def moved_codes(q: torch.Tensor, offsets: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes ``q`` ``[N, K]`` moved by trained ``offsets`` (``TRAINABLE_CODES``) one grid step
    either way at most, on the grid (float)."""
    move = (CODE_GAIN * offsets.detach()).clamp(-1, 1)
    return (q.float() + move).round().clamp(0, 2**bits - 1)


def _codes(module: QuantLinear, scales: torch.Tensor, zeros: torch.Tensor,
           offsets: torch.Tensor | None = None) -> QuantizedWeight:
    """The layer's codes (moved by ``offsets``) with these scales and zero points; float zero points
    and moved codes are rounded onto the grid, as ``trainable.freeze_scales`` will store them."""
    weight = module.unpack()
    weight.scales = scales.detach()
    weight.zeros = zeros.detach().round().clamp(0, 2**module.format.bits - 1)
    if offsets is not None:
        weight.q = moved_codes(weight.q, offsets, module.format.bits)
    return weight


class _ScaledMatmul(torch.autograd.Function):
    """``y = x @ (s * (round(q + o) - round(z)))^T + b``, differentiable in ``x``, the scales ``s``,
    the zero points ``z`` and the code offsets ``o`` (None: the codes stay): the forward pass of a
    layer whose scales train (``trainable.py``, where the gradients are derived). As in
    ``_PackedMatmul``, the backward dequantizes the weight again instead of keeping it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, offsets: torch.Tensor | None,
                module: QuantLinear):
        ctx.module = module
        ctx.save_for_backward(x, scales, zeros, offsets)
        weight = _codes(module, scales, zeros, offsets).dequantize()
        bias = module.bias.to(x.dtype) if module.bias is not None else None
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scales, zeros, offsets = ctx.saved_tensors
        weight = _codes(ctx.module, scales, zeros, offsets)
        w = weight.dequantize()
        grad2 = grad.reshape(-1, grad.shape[-1]).float()
        grad_x = (grad2 @ w).view(*grad.shape[:-1], w.shape[1]).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = grad_z = grad_o = None
        if not any(ctx.needs_input_grad[1:4]):
            return grad_x, None, None, None, None
        grad_w = grad2.t() @ x.reshape(-1, x.shape[-1]).float()  # [N, K], dropped on return
        if ctx.needs_input_grad[1]:
            # q - z is w / s (scales are positive): sum dW * w over each group, then divide.
            grad_s = (_group_sum(grad_w * w, weight) / weight.scales.float()).to(scales.dtype)
        if ctx.needs_input_grad[2]:
            grad_z = (-_group_sum(grad_w, weight) * scales.detach().float()).to(zeros.dtype)
        if ctx.needs_input_grad[3]:
            # dW/dq = s, straight through the rounding, and q moves by CODE_GAIN * o.
            grad_o = (grad_w * weight.scales.t().float()[:, weight.g_idx.long()] * CODE_GAIN).to(offsets.dtype)
        return grad_x, grad_s, grad_z, grad_o, None


class QuantLinear(nn.Module):
    """``y = x @ dequant(W)^T + b`` with ``W`` stored packed (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: LinearFormat,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.format = fmt
        groups = group_count(in_features, fmt.group_size)
        bits = fmt.bits
        self.register_buffer(
            "qweight", torch.zeros(packed_length(in_features, bits), out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, packed_length(out_features, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=fmt.torch_scale_dtype, device=device))
        if fmt.act_order:
            self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._kernel = None  # the repacked weight of the chosen kernel, built on first use

    def _apply(self, fn, *args, **kwargs):
        self._kernel = None  # moved or cast: repack for the new device on the next forward
        # The scales keep the dtype the format records (model.to(torch.bfloat16) would round
        # float16 scales, and the save would disagree with the config); they follow moves only.
        scales = self._buffers.get("scales")
        result = super()._apply(fn, *args, **kwargs)
        moved = self._buffers.get("scales")
        if scales is not None and moved is not None and moved.dtype != scales.dtype:
            self._buffers["scales"] = scales.to(moved.device)
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel = None  # new weights: the repacked copy is stale
        return super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, fmt: LinearFormat) -> QuantLinear:
        """Pack a :class:`QuantizedWeight` (codes ``[N, K]``) into a new module on the same device."""
        n, k = qw.q.shape
        if (qw.bits, qw.group_size, qw.sym) != (fmt.bits, fmt.group_size, fmt.sym):
            raise ValueError(f"quantized weight ({qw.bits} bits, group {qw.group_size}) does not match {fmt}")
        dtype = bias.dtype if bias is not None else None
        module = cls(k, n, fmt, bias=bias is not None, device=qw.q.device, dtype=dtype)
        module.qweight.copy_(pack_rows(qw.q.t(), fmt.bits))
        module.qzeros.copy_(pack_columns(qw.zeros, fmt.bits))
        module.scales.copy_(qw.scales)
        if fmt.act_order:
            module.g_idx.copy_(qw.g_idx)
        elif not torch.equal(qw.g_idx.cpu(), group_index(k, fmt.group_size)):
            raise ValueError("a permuted group index needs act_order=True to be stored")
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def unpack(self) -> QuantizedWeight:
        """The stored weight as unpacked codes, scales, zeros and group index."""
        fmt = self.format
        g_idx = self.g_idx if self.g_idx is not None else group_index(self.in_features, fmt.group_size, self.qweight.device)
        return QuantizedWeight(
            q=unpack_rows(self.qweight, fmt.bits, self.in_features).t().contiguous(),
            scales=self.scales,
            zeros=unpack_columns(self.qzeros, fmt.bits, self.out_features),
            g_idx=g_idx,
            bits=fmt.bits,
            group_size=fmt.group_size,
            sym=fmt.sym,
        )

    def dequantize_weight(self) -> torch.Tensor:
        """float32 ``[N, K]``: the weight this layer multiplies by."""
        return self.unpack().dequantize()

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, float32 ``[N, K]``, for code that inspects ``.weight``.

        transformers' initializers touch ``.weight`` of known submodules (GPT-2 rescales
        ``c_proj.weight``); the forward pass never uses this, and writing to it changes nothing.
        While a compressed-tensors checkpoint loads into the module (``formats/compressed_tensors``)
        there is nothing to dequantize yet: an empty tensor of the weight's shape stands in.
        """
        if "qweight" not in self._buffers:
            return torch.empty(self.out_features, self.in_features, device=self.weight_packed.device)
        return self.dequantize_weight()

    def prepare_kernel(self, device: torch.device | None = None) -> dispatch.Kernel | None:
        """Repack for the fastest kernel on ``device`` (default: the buffers'), once; None: reference path."""
        device = torch.device(device) if device is not None else self.qweight.device
        kernel = self._kernel
        if kernel is None or kernel.device != device or kernel.mode != dispatch.current_mode():
            kernel = self._kernel = dispatch.prepare(self, device)
        return kernel if kernel.usable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._parameters:
            return self._trainable_forward(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return _PackedMatmul.apply(x, self)  # training through the layer: see _PackedMatmul
        return self._forward_packed(x)

    def _trainable_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scales (and zero points) in training: the kernels baked the stored ones in, so every
        # pass, evaluation included, dequantizes with the current values.
        log_scales = self._parameters.get(TRAINABLE_SCALES)
        scales = log_scales.exp() if log_scales is not None else self.scales.float()
        zeros = self._parameters.get(TRAINABLE_ZEROS)
        if zeros is None:  # symmetric (or zero points frozen): the stored integers
            zeros = unpack_columns(self.qzeros, self.format.bits, self.out_features).float()
        return _ScaledMatmul.apply(x, scales, zeros, self._parameters.get(TRAINABLE_CODES), self)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.prepare_kernel(x.device) if dispatch.enabled() else None
        if kernel is not None and kernel.accepts(x):
            y = kernel(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            return y + self.bias.to(y.dtype) if self.bias is not None else y
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then matmul: the definition every kernel is tested against."""
        weight = self.dequantize_weight().to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        f = self.format
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={f.bits}, "
            f"group_size={f.group_size}, sym={f.sym}, act_order={f.act_order}, bias={self.bias is not None}"
        )


def prepare_kernels(model: nn.Module, device: torch.device | str | None = None) -> dict[str, int]:
    """Repack every QuantLinear of ``model`` for its kernel now (else on its first forward).

    Call it before ``torch.compile`` or CUDA graph capture. Returns how many layers use each kernel.
    """
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            kernel = module.prepare_kernel(device)
            name = kernel.name if kernel is not None else "reference"
            counts[name] = counts.get(name, 0) + 1
    return counts


def is_packed_linear(module: nn.Module) -> bool:
    """A packed layer called as a linear layer: not a packed embedding table (a lookup) nor a
    packed weight tensor (read by its owner's code), which subclass ``QuantLinear``."""
    return type(module) is QuantLinear
