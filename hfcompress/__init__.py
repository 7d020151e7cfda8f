"""hfcompress: smaller, faster transformers models, in the tools you already use.

``import hfcompress`` registers ``quant_method: "hfcompress"`` with transformers, so that
``from_pretrained(..., compression=recipe)`` compresses while loading and a plain
``from_pretrained(folder)`` reloads what ``save_pretrained`` wrote.
"""

from .config import CompressionConfig, compression_record
from .evaluation import PerplexityResult, evaluate_perplexity
from .integration import register
from .integration.compress import compress
from .io import load_model, save_compressed
from .quantization import LinearFormat, QuantLinear, prepare_kernels
from .recipe import CalibrationConfig, PruneStage, QuantizeStage, Recipe, RecipeError

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "CompressionConfig",
    "LinearFormat",
    "PerplexityResult",
    "PruneStage",
    "QuantLinear",
    "QuantizeStage",
    "Recipe",
    "RecipeError",
    "compress",
    "compression_record",
    "evaluate_perplexity",
    "load_model",
    "prepare_kernels",
    "register",
    "save_compressed",
]

# The one import-time action: explicit registration with transformers.
register()
