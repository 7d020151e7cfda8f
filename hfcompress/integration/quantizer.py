"""The transformers quantizer for ``quant_method: "hfcompress"``: a thin adapter to our pipeline.

- loading a float checkpoint with ``quantization_config=CompressionConfig(recipe)``: the weights
  load as usual, then :func:`hfcompress.compress` runs the recipe;
- loading a checkpoint saved by hfcompress: pruned per-layer shapes, relaxed-sharing wrappers and
  the packed modules are rebuilt on the meta device before the weights load (with the
  compressed-tensors buffers in place of ours for a compressed-tensors save, turned into ours
  once loaded), after the
  checkpoint files are checked for truncation and for the tensors the config promises; layers
  that share weights are pointed at their owner's modules once the weights are in.
"""

from __future__ import annotations

from torch import nn
from transformers.quantizers.base import HfQuantizer

from ..config import FORMAT_VERSION, PLAIN_RECORD, QUANT_METHOD, CompressionConfig
from ..formats import compressed_tensors
from ..formats.checkpoint import check_quantized_checkpoint, packed_conversions
from ..pipeline import apply_recipe, rebuild
from ..quantization.dequantize import dequantize_model
from ..sharing.layers import tie_shared_modules


def _drop_packed_ties(model) -> None:
    """Forget transformers' tied-parameter pairs whose parameter a packed module replaced (Zamba
    ties its shared blocks' linear weights across layers): those layers load their packed tensors."""
    ties = getattr(model, "all_tied_weights_keys", None)
    if not ties:
        return
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    model.all_tied_weights_keys = {k: v for k, v in ties.items() if k in params and v in params}


class CompressionQuantizer(HfQuantizer):
    """Delegates to :mod:`hfcompress.pipeline` and :mod:`hfcompress.quantization.stage`."""

    requires_calibration = False
    quantization_config: CompressionConfig

    def validate_environment(self, *args, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized and config.recipe is None:
            raise ValueError(
                "CompressionConfig has no recipe to apply to this float checkpoint: pass "
                "CompressionConfig(recipe=...) or from_pretrained(..., compression=recipe)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            rebuild(model, self.quantization_config)
            if self.quantization_config.storage == "compressed-tensors":
                for name in self.quantization_config.modules:
                    compressed_tensors.expect_pack_quantized(model.get_submodule(name))
            _drop_packed_ties(model)
            if checkpoint_files:
                check_quantized_checkpoint(checkpoint_files, model, self.quantization_config)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        conversions = super().update_weight_conversions(weight_conversions, model)
        return packed_conversions(conversions, self.quantization_config.modules) if self.pre_quantized else conversions

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            if self.quantization_config.storage == "compressed-tensors":
                for name in self.quantization_config.modules:
                    compressed_tensors.restore_native(model.get_submodule(name))
                self.quantization_config.storage = QUANT_METHOD  # in memory it is ours now, and saves as chosen then
            tie_shared_modules(model, self.quantization_config.shared)  # the users' tensors were not in the file
        else:
            config = apply_recipe(model, self.quantization_config.recipe, config=self.quantization_config)
            attach_or_detach(model, config)
        return model

    def dequantize(self, model, dtype=None):
        """``model.dequantize()``: float modules in place of the packed ones (see
        :mod:`hfcompress.quantization.dequantize`). A model still pruned per layer or sharing
        layers keeps its record (reloading needs it); otherwise it is a plain checkpoint again."""
        config = self.quantization_config
        dequantize_model(model, config, dtype if dtype is not None else model.config.dtype)
        if config.needs_plugin():
            attach_config(model, config)
        else:
            detach_config(model)
        return model

    def get_state_dict_and_metadata(self, model):
        return None, {"hfcompress_format_version": str(FORMAT_VERSION)}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        # Packed layers pass gradients to their inputs (their weights stay frozen): adapters on
        # them, and the float parameters around them, train.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return self.is_trainable


# The transformers attributes that make a compressed model save and reload as one. They live here,
# beside the quantizer they name; the pipeline knows nothing of transformers' quantizer plumbing.

def release_foreign_quantization(model: nn.Module) -> None:
    """Drop a GGUF loader's quantization config (its weights are already float); refuse others."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    method = getattr(quantizer.quantization_config.quant_method, "value", quantizer.quantization_config.quant_method)
    if method == "gguf":
        # transformers dequantized the GGUF tensors on load; the config only describes the source file.
        quantizer.remove_quantization_config(model)
    elif method == "hfcompress":
        if quantizer.quantization_config.modules and getattr(quantizer, "pre_quantized", False):
            raise ValueError("this model is already compressed by hfcompress; compress its original checkpoint instead")
    else:
        raise ValueError(
            f"this model is already quantized with {method!r}; hfcompress compresses float checkpoints: "
            "load the unquantized model"
        )


def attach_config(model: nn.Module, config: CompressionConfig) -> None:
    """Make ``save_pretrained`` write the compressed format and ``from_pretrained`` rebuild it."""
    if not hasattr(model, "config"):
        return
    model.config.quantization_config = config
    if not isinstance(getattr(model, "hf_quantizer", None), CompressionQuantizer):
        model.hf_quantizer = CompressionQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module, "base_model_prefix"):
            module.config._is_quantized = True


def detach_config(model: nn.Module) -> None:
    """Leave no hfcompress config on a model that is a plain checkpoint again (e.g. uniformly
    pruned, nothing packed): it then saves and reloads without the plugin."""
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(quantizer, CompressionQuantizer):
        quantizer.remove_quantization_config(model)
    elif isinstance(getattr(getattr(model, "config", None), "quantization_config", None), CompressionConfig):
        del model.config.quantization_config
    for module in model.modules():
        if hasattr(module, "config") and getattr(module.config, "_is_quantized", False):
            module.config._is_quantized = False


def attach_or_detach(model: nn.Module, config: CompressionConfig) -> None:
    """After a recipe ran: the quantizer when reloading needs hfcompress, else a plain checkpoint
    whose record (:func:`~hfcompress.config.compression_record`) stays only for its model card."""
    if config.needs_plugin():
        attach_config(model, config)
        vars(model).pop(PLAIN_RECORD, None)
    else:
        detach_config(model)
        setattr(model, PLAIN_RECORD, config)
