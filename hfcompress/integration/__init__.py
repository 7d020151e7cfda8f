"""transformers integration: the quantizer plugin and the from_pretrained/save_pretrained wrappers."""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..config import QUANT_METHOD, CompressionConfig
from . import patches
from .quantizer import CompressionQuantizer


def register() -> None:
    """Register ``quant_method: "hfcompress"`` with transformers and install the wrappers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not CompressionConfig:
        register_quantization_config(QUANT_METHOD)(CompressionConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not CompressionQuantizer:
        register_quantizer(QUANT_METHOD)(CompressionQuantizer)
    patches.install()
