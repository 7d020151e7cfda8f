"""Weight quantization: the integer grid, bit packing, RTN, and the packed QuantLinear module."""

from .grid import QuantizedWeight
from ..linear_format import LinearFormat
from .qlinear import QuantLinear, prepare_kernels
from .rtn import quantize_rtn

__all__ = ["LinearFormat", "QuantLinear", "QuantizedWeight", "prepare_kernels", "quantize_rtn"]
