"""The model-family registry: where blocks, linears, attention, MLPs, experts and config keys are.

Detected from the module tree and the config for any transformers model; explicit entries only
where detection cannot work. No other part of hfcompress names a model type.
"""

from .blocks import (BLOCK_PATHS, ArchitectureError, block_names, blocks_path, decoder_blocks, final_norm,
                     language_model_path, model_type)
from .experts import ExpertLinears, find_expert_linears, find_fused_experts, is_fused_experts, unfuse_experts
from .linear import (LINEAR_TYPES, find_linear_layers, is_linear, is_linear_like, keep_inputs, keep_outputs, linear_shape,
                     linear_weight, linear_weight_grad, matches, model_configs, output_embedding_names, raw_weights,
                     resize_linear, weight_shape)

__all__ = [
    "BLOCK_PATHS", "ArchitectureError", "ExpertLinears", "LINEAR_TYPES", "block_names", "blocks_path",
    "decoder_blocks", "final_norm", "find_expert_linears", "find_fused_experts", "find_linear_layers", "is_fused_experts",
    "is_linear", "is_linear_like", "keep_inputs", "keep_outputs", "language_model_path", "linear_shape", "linear_weight",
    "linear_weight_grad", "matches", "model_configs", "model_type", "output_embedding_names", "raw_weights", "resize_linear",
    "unfuse_experts", "weight_shape",
]
