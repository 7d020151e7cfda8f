"""LinearFormat: how one packed linear layer is stored (bits, group size, symmetry, act-order,
scale dtype). A leaf: the config and the checkpoint checks read it without the modules.

>>> LinearFormat(bits=4, group_size=64, sym=True).to_dict()
{'bits': 4, 'group_size': 64, 'sym': True, 'act_order': False, 'scale_dtype': 'float16'}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


# Code widths the packing (quantization/pack.py) and the kernels handle.
SUPPORTED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class LinearFormat:
    """How one linear layer is stored: recorded per module in the config, rebuilt on load."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self):
        if type(self.bits) is not int or type(self.group_size) is not int:
            raise ValueError(f"bits and group_size must be whole numbers, got {self.bits!r:.40} and {self.group_size!r:.40}")
        if not isinstance(self.sym, bool) or not isinstance(self.act_order, bool):
            raise ValueError(f"sym and act_order must be true or false, got {self.sym!r:.40} and {self.act_order!r:.40}")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; valid: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be -1 (one group per row) or positive")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        return asdict(self)
