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
GROUP_LIMIT = 2**31 - 1  # sizes are stored as int32 by every reader


class FormatError(ValueError):
    """One field of a :class:`LinearFormat` out of range: which, what it must be, what it was."""

    def __init__(self, field: str, expected: str, value):
        super().__init__(f"{field}: expected {expected}, got {value!r:.40}")
        self.field, self.expected, self.value = field, expected, value


@dataclass(frozen=True)
class LinearFormat:
    """How one linear layer is stored: recorded per module in the config, rebuilt on load."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool = False
    scale_dtype: str = "float16"

    def __post_init__(self):
        # The one check of a format, whether a stage builds it or config.json describes it (the
        # config's reader adds where in the file the field was).
        whole = type(self.group_size) is int and -1 <= self.group_size <= GROUP_LIMIT
        checks = (
            ("bits", type(self.bits) is int and self.bits in SUPPORTED_BITS,
             ", ".join(map(str, SUPPORTED_BITS[:-1])) + f" or {SUPPORTED_BITS[-1]}"),
            ("group_size", whole, f"a whole number from -1 to {GROUP_LIMIT:,}"),
            ("group_size", self.group_size != 0, "-1 (one group per row) or a positive size"),
            ("sym", isinstance(self.sym, bool), "true or false"),
            ("act_order", isinstance(self.act_order, bool), "true or false"),
            ("scale_dtype", isinstance(self.scale_dtype, str) and self.scale_dtype in SCALE_DTYPES,
             ", ".join(list(SCALE_DTYPES)[:-1]) + f" or {list(SCALE_DTYPES)[-1]}"),
        )
        for field, ok, expected in checks:
            if not ok:
                raise FormatError(field, expected, getattr(self, field))

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        return asdict(self)
