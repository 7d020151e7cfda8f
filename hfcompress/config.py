"""CompressionConfig: what hfcompress did to a model, saved in ``config.json`` for reload.

It is a transformers ``QuantizationConfigMixin`` with ``quant_method: "hfcompress"``. Before
compression it carries the recipe to apply; afterwards also the storage format of every
compressed module, which is what ``from_pretrained`` needs to rebuild the packed modules before
the weights load. In ``config.json`` it reads::

    "quantization_config": {
      "quant_method": "hfcompress",
      "format_version": 1,
      "recipe": {"stages": [{"quantize": {"method": "rtn", "bits": 4, ...}}]},
      "quantized": [{"bits": 4, "group_size": 128, "sym": true, "act_order": false,
                     "scale_dtype": "float16", "modules": ["model.layers.0.self_attn.q_proj", ...]}],
      "pruned": {"head_dim": 64, "layers": [{"heads": 6, "kv_heads": 2, "ffn": 1152}, ...]},
      "shared": {"modules": {"model.layers.1.mlp.up_proj": "model.layers.0.mlp.up_proj", ...}},
      "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
      "license": "apache-2.0",
      "metrics": {"perplexity": {"perplexity": 17.8, "dataset": "WikiText-2 (raw, test)", ...}}
    }

``base_model`` (a Hub id), ``license`` (the source model's, as the Hub spells it) and
``metrics`` are what the model card (:mod:`hfcompress.card`) publishes; none of them holds a
local path.

>>> config = CompressionConfig(recipe={"stages": [{"quantize": {"bits": 4}}]})
>>> CompressionConfig.from_dict(config.to_dict()).recipe == config.recipe
True
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quantization.qlinear import LinearFormat
from .errors import CheckpointError
from .recipe import Recipe

QUANT_METHOD = "hfcompress"
FORMAT_VERSION = 1
STORAGES = (QUANT_METHOD, "compressed-tensors")


class CompressionConfig(QuantizationConfigMixin):
    """The recipe to apply (or applied), and the format of each compressed module."""

    def __init__(
        self,
        recipe: Recipe | dict | str | None = None,
        quantized: list[dict] | None = None,
        base_model: str | None = None,
        license: str | None = None,
        metrics: dict | None = None,
        pruned: dict | None = None,
        shared: dict | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        storage: str = QUANT_METHOD,
        **unknown: Any,
    ):
        if unknown:
            raise ValueError(
                f"unknown key(s) in the hfcompress quantization_config: {', '.join(sorted(unknown))}; valid keys: "
                "quant_method, format_version, recipe, quantized, pruned, shared, base_model, license, metrics, storage"
            )
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method is {quant_method!r}; CompressionConfig reads {QUANT_METHOD!r} only")
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses hfcompress format version {format_version}, newer than this install "
                f"reads ({FORMAT_VERSION}): upgrade hfcompress (pip install -U hfcompress)"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        if storage not in STORAGES:
            raise ValueError(f"storage is {storage!r}; valid: {', '.join(STORAGES)}")
        # How the packed tensors of the checkpoint being loaded are laid out: ours, or
        # compressed-tensors' (a default save, see hfcompress.formats.folder); once loaded, ours.
        self.storage = storage
        self.recipe = None if recipe is None else Recipe.load(recipe)
        self.modules: dict[str, LinearFormat] = {}
        for group in quantized or []:
            group = dict(group)
            names = group.pop("modules")
            fmt = LinearFormat(**group)
            self.modules.update({name: fmt for name in names})
        self.base_model = base_model
        self.license = license  # the source model's license, carried to the model card
        self.metrics = dict(metrics or {})
        # Per-layer sizes after structured pruning, when the model's config cannot express them:
        # {"head_dim": d, "layers": [{"heads": h, "kv_heads": kv, "ffn": f}, ...]}.
        self.pruned = copy.deepcopy(pruned) if pruned else None
        # Modules used by several layers, stored once: {"modules": {user: owner}, "lora": {"rank": r,
        # "modules": [...]}} (see hfcompress.sharing); owners are the names the tensors are saved under.
        self.shared = copy.deepcopy(shared) if shared else None

    def needs_plugin(self) -> bool:
        """Whether reloading needs hfcompress: packed modules, or shapes the config cannot express."""
        return bool(self.modules or self.pruned or self.shared)

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        try:
            config = cls(**config_dict)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"invalid hfcompress quantization_config in config.json: {err}") from None
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        groups: dict[LinearFormat, list[str]] = {}
        for name, fmt in self.modules.items():
            groups.setdefault(fmt, []).append(name)
        out: dict[str, Any] = {"quant_method": QUANT_METHOD, "format_version": self.format_version}
        out["recipe"] = None if self.recipe is None else self.recipe.to_dict()
        out["quantized"] = [{**fmt.to_dict(), "modules": names} for fmt, names in groups.items()]
        if self.pruned:
            out["pruned"] = copy.deepcopy(self.pruned)
        if self.shared:
            out["shared"] = copy.deepcopy(self.shared)
        if self.storage != QUANT_METHOD:
            out["storage"] = self.storage
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.license is not None:
            out["license"] = self.license
        if self.metrics:
            out["metrics"] = copy.deepcopy(self.metrics)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other):
        return isinstance(other, CompressionConfig) and self.to_dict() == other.to_dict()

