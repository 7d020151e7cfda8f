"""Training text for distillation: tokenized whole, packed into fixed-length blocks.

Packing (as in transformers' ``run_clm`` example) wastes no tokens on padding and makes every
batch hold the same number of tokens, so a per-batch mean loss divided by the gradient
accumulation steps is exactly the mean over the accumulated batch (and over processes).

>>> import torch
>>> blocks = PackedBlocks(torch.arange(10), block_size=4)
>>> len(blocks), blocks[1]["input_ids"].tolist()
(2, [4, 5, 6, 7])
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..data import tokenize


class PackedBlocks(Dataset):
    """``ids`` cut into ``len(ids) // block_size`` blocks of ``block_size`` tokens (the rest dropped)."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        ids = ids.flatten().long()
        if ids.numel() < block_size:
            raise DataError(f"the training text has {ids.numel()} tokens, fewer than one block of {block_size}")
        n = ids.numel() // block_size
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def packed_dataset(tokenizer, data: Any, block_size: int, max_tokens: int | None = None, **text_kwargs) -> PackedBlocks:
    """Blocks from a text file, a folder of ``.txt`` files, a ``datasets`` name or dataset, or token ids.

    ``max_tokens`` keeps only the first tokens (a fixed training budget).
    """
    text_kwargs.setdefault("split", "train")  # a datasets name: train on its training split
    ids = tokenize(tokenizer, data, **text_kwargs)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return PackedBlocks(ids, block_size)
