"""PEFT on packed layers: LoRA (and DoRA) adapters on :class:`QuantLinear`, as peft does for
GPTQ and bitsandbytes layers.

peft builds the adapter layer of each target through a chain of dispatchers that knows its own
quantized layer types only, and ``target_modules="all-linear"`` looks for ``nn.Linear``. Once
peft is imported (never by hfcompress itself: it costs seconds), :func:`patch_peft` adds our
dispatcher in front of peft's, counts packed layers as linear layers, and makes
``merge_and_unload()`` dequantize the packed base first, so that merging gives a float model.

>>> import torch, hfcompress, peft
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = hfcompress.compress(LlamaForCausalLM(LlamaConfig(
...     hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100)),
...     {"stages": [{"quantize": {"bits": 4, "group_size": 32}}]})
>>> lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
>>> type(lora.base_model.model.model.layers[0].self_attn.q_proj).__name__
'PackedLoraLinear'
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys

from torch import nn

from ..config import compression_record
from ..quantization.qlinear import QuantLinear, is_packed_linear

logger = logging.getLogger(__name__)

_PATCHED: dict[str, object] = {}


def _packed_lora_class():
    """Built on first use: peft's LoRA ``Linear`` is the base class, and peft is optional."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers.pytorch_utils import Conv1D

    class PackedLoraLinear(LoraLinear):
        """LoRA on a packed linear layer: the adapter trains in float, the packed weight stays
        frozen (it passes gradients to its input, see ``QuantLinear``). Merging needs a float
        weight: ``merge_and_unload()`` dequantizes the base first; ``merge()`` on its own turns
        this layer's base into a float ``nn.Linear``."""

        def _get_in_out_features(self, module: nn.Module):
            if isinstance(module, QuantLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            base = self.get_base_layer()
            if isinstance(base, QuantLinear):
                self.base_layer = _float_linear(base)
            elif isinstance(base, Conv1D):  # dequantized to the family's own Conv1D
                self.fan_in_fan_out = True
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

        def __repr__(self) -> str:
            return "lora." + super().__repr__().removeprefix("lora.")

    return PackedLoraLinear


def _float_linear(packed: QuantLinear) -> nn.Linear:
    linear = nn.Linear(packed.in_features, packed.out_features, bias=packed.bias is not None,
                       device=packed.qweight.device, dtype=packed.bias.dtype if packed.bias is not None else None)
    linear.weight.data = packed.dequantize_weight().to(linear.weight.dtype)
    if packed.bias is not None:
        linear.bias.data = packed.bias.detach().clone()
    return linear


@functools.cache
def packed_lora_linear() -> type:
    return _packed_lora_class()


def _dispatch_packed(target: nn.Module, adapter_name: str, config, **kwargs):
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if is_packed_linear(base):
        return packed_lora_linear()(target, adapter_name, config=config, **kwargs)
    return None


def _create_new_module(original, lora_config, adapter_name, target, **kwargs):
    module = _dispatch_packed(target, adapter_name, lora_config, **kwargs)
    return module if module is not None else original(lora_config, adapter_name, target, **kwargs)


def _include_all_linear(original, peft_config, model):
    """``all-linear`` also targets packed linear layers (not a packed embedding or output head)."""
    wanted = isinstance(getattr(peft_config, "target_modules", None), str) and \
        peft_config.target_modules.lower() == "all-linear"
    peft_config = original(peft_config, model)
    if wanted:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        peft_config.target_modules = set(peft_config.target_modules) | {
            name for name, module in model.named_modules()
            if is_packed_linear(module) and module is not head and ".base_layer" not in name and "lora_" not in name}
    return peft_config


def _unload_and_optionally_merge(original, self, merge: bool = True, *args, **kwargs):
    model = self.model
    record = compression_record(model)
    if merge and record is not None and record.modules:
        model.dequantize()  # merged adapters need float weights: dequantize the packed base first
    return original(self, merge, *args, **kwargs)


def _wrap(owner, name: str, wrapper, static: bool = False) -> None:
    original = getattr(owner, name)
    _PATCHED[f"{owner.__qualname__}.{name}"] = original

    if static:
        @functools.wraps(original)
        def method(*args, **kwargs):
            return wrapper(original, *args, **kwargs)

        setattr(owner, name, staticmethod(method))
    else:
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            return wrapper(original, self, *args, **kwargs)

        setattr(owner, name, method)


def patch_peft() -> None:
    """Teach an imported peft about packed layers (idempotent)."""
    if _PATCHED:
        return
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    _wrap(LoraModel, "_create_new_module", _create_new_module, static=True)
    original = tuners_utils._maybe_include_all_linear_layers
    _PATCHED["_maybe_include_all_linear_layers"] = original
    tuners_utils._maybe_include_all_linear_layers = functools.wraps(original)(
        functools.partial(_include_all_linear, original))
    _wrap(tuners_utils.BaseTuner, "_unload_and_optionally_merge", _unload_and_optionally_merge)
    logger.debug("peft: LoRA on packed layers enabled")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callback`` right after the module ``name`` is first imported (executed: a mere
    ``find_spec`` probe, as ``is_peft_available()`` makes, does not count)."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self._finding = name, callback, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True  # find the real spec without coming back here
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            self.callback()

        spec.loader.exec_module = exec_then_patch
        return spec


def install() -> None:
    """Patch peft now if it is imported, else as soon as it is (it is optional, and slow to import)."""
    if "peft" in sys.modules:
        patch_peft()
    elif importlib.util.find_spec("peft") is not None and not any(
            isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("peft", patch_peft))
