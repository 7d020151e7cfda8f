"""QuantEmbedding: one packed table for the token lookup and, when tied, the output projection.

An embedding table ``[V, H]`` is stored exactly like a linear layer with ``in_features = H`` and
``out_features = V`` (``qweight [ceil(H*bits/32), V]``, groups along H, one scale per group and
token), so the same buffers serve both uses:

- called with token ids, it looks up rows: only the looked-up columns of ``qweight`` are unpacked
  and dequantized, then scaled by the embedding's own factor where the family has one (Gemma
  multiplies its embeddings by ``sqrt(hidden)``);
- called with hidden states, it is the output projection ``x @ table^T`` through the
  :class:`QuantLinear` kernels.

A tied model's ``lm_head`` is the same module object as its input embeddings, stored once and
tied again on load through the sharing record (``{"lm_head": "model.embed_tokens"}``), so the
table is never untied to be quantized.

>>> import torch
>>> from hfcompress.quantization.rtn import quantize_rtn
>>> table = torch.nn.Embedding(50, 32)
>>> fmt = LinearFormat(bits=8, group_size=16, sym=True)
>>> packed = QuantEmbedding.from_quantized(quantize_rtn(table.weight.detach(), 8, 16, True), fmt, table)
>>> ids = torch.tensor([[3, 7, 3]])
>>> rows = packed(ids)
>>> rows.shape, bool((rows - table(ids)).abs().max() < 0.02)
(torch.Size([1, 3, 32]), True)
>>> packed(torch.randn(2, 32)).shape  # as the output projection
torch.Size([2, 50])
"""

from __future__ import annotations

import torch
from torch import nn

from .grid import QuantizedWeight
from .pack import pack_columns, pack_rows, unpack_columns, unpack_rows
from .qlinear import LinearFormat, QuantLinear


def embedding_scale(module: nn.Module) -> torch.Tensor | None:
    """The factor a family's embedding module multiplies its rows by (Gemma's ``embed_scale``)."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().float().reshape(())
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return torch.tensor(float(scale))
    return None


class QuantEmbedding(QuantLinear):
    """A packed ``[num_embeddings, embedding_dim]`` table; a lookup for ids, a projection for floats."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: LinearFormat, dtype: torch.dtype = torch.float32,
                 scale: torch.Tensor | None = None, device=None):
        super().__init__(embedding_dim, num_embeddings, fmt, bias=False, device=device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        # Not saved: the dtype rows come out in (follows model.to(dtype)), and the family's scale.
        self.register_buffer("output_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("embed_scale", None if scale is None else scale.to(device=device, dtype=torch.float32),
                             persistent=False)

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, fmt: LinearFormat, original: nn.Module) -> QuantEmbedding:
        """Pack ``qw`` (codes ``[V, H]``) as the table of ``original`` (an ``nn.Embedding``)."""
        if fmt.act_order:
            raise ValueError("an embedding table is quantized in natural order (no act-order)")
        V, H = qw.q.shape
        module = cls(V, H, fmt, original.weight.dtype, embedding_scale(original), device=qw.q.device)
        module.qweight.copy_(pack_rows(qw.q.t(), fmt.bits))
        module.qzeros.copy_(pack_columns(qw.zeros, fmt.bits))
        module.scales.copy_(qw.scales)
        return module

    @classmethod
    def empty_like(cls, original: nn.Module, fmt: LinearFormat) -> QuantEmbedding:
        """An empty table shaped like ``original`` (before a checkpoint's tensors load)."""
        weight = original.weight
        return cls(weight.shape[0], weight.shape[1], fmt, weight.dtype, embedding_scale(original), device=weight.device)

    def packed_elements(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for ``ids`` (any shape), dequantized: ``[*ids.shape, embedding_dim]``."""
        fmt = self.format
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)  # dequantize each distinct token once
        codes = unpack_rows(self.qweight.index_select(1, unique), fmt.bits, self.in_features).float()  # [H, n]
        zeros = unpack_columns(self.qzeros, fmt.bits, self.out_features).index_select(1, unique).float()  # [G, n]
        scales = self.scales.index_select(1, unique).float()  # [G, n]
        group = torch.arange(self.in_features, device=ids.device) // (
            self.in_features if fmt.group_size == -1 else fmt.group_size)
        rows = ((codes - zeros[group]) * scales[group]).t()  # [n, H]
        if self.embed_scale is not None:
            rows = rows * self.embed_scale
        rows = rows.to(self.output_dtype_probe.dtype)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return self.lookup(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        f = self.format
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, bits={f.bits}, "
                f"group_size={f.group_size}, sym={f.sym}, scaled={self.embed_scale is not None}")
