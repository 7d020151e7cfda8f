"""``torch.ops.hfcompress.quant_matmul``: the Triton kernels as a torch custom op.

Registering through ``torch.library`` makes the kernel opaque to ``torch.compile`` (which traces
the op by its fake implementation instead of stepping into Triton's launcher) and lets CUDA graphs
capture it like any other op.

    out = torch.ops.hfcompress.quant_matmul(x2d, qweight, scales, qzeros, bits, group_size)
"""

from __future__ import annotations

import torch

from .quant_matmul import quant_matmul


@torch.library.custom_op("hfcompress::quant_matmul", mutates_args=())
def quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                    bits: int, group_size: int) -> torch.Tensor:
    """``x [M, K] @ dequant(W)^T -> [M, N]`` in ``x.dtype`` (contract in ``quant_matmul.py``)."""
    return quant_matmul(x, qweight, scales, qzeros, bits, group_size)


@quant_matmul_op.register_fake
def _(x, qweight, scales, qzeros, bits, group_size):
    return x.new_empty(x.shape[0], scales.shape[1])
