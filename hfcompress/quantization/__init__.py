"""Weight quantization: the integer grid, bit packing, RTN, and the packed QuantLinear module."""

from .dispatch import prepare_kernels
from .grid import QuantizedWeight
from .qlinear import LinearFormat, QuantLinear
from .rtn import quantize_rtn

__all__ = ["LinearFormat", "QuantLinear", "QuantizedWeight", "prepare_kernels", "quantize_rtn"]
