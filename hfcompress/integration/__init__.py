"""transformers integration: the quantizer plugin, the from_pretrained/save_pretrained wrappers,
and peft's adapters on packed layers."""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from ..config import QUANT_METHOD, CompressionConfig
from . import patches, peft
from .quantizer import CompressionQuantizer


def register() -> None:
    """Register ``quant_method: "hfcompress"`` with transformers and install the wrappers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not CompressionConfig:
        register_quantization_config(QUANT_METHOD)(CompressionConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not CompressionQuantizer:
        register_quantizer(QUANT_METHOD)(CompressionQuantizer)
    patches.install()
    peft.install()  # LoRA on packed layers, once peft is imported
