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
from dataclasses import dataclass, field, fields
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import CheckpointError
from .linear_format import FormatError, LinearFormat
from .models.layout import LayerSizes
from .recipe import INT_LIMIT, Recipe, RecipeError, shown

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
        pruned: PrunedRecord | dict | None = None,
        shared: SharedRecord | dict | None = None,
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
        if not isinstance(format_version, int) or isinstance(format_version, bool) or format_version < 1:
            raise ValueError(f"format_version is {shown(format_version)}; hfcompress writes {FORMAT_VERSION}")
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
        self.pruned: PrunedRecord | None = _as_record(PrunedRecord, pruned)
        self.shared: SharedRecord | None = _as_record(SharedRecord, shared)

    def needs_plugin(self) -> bool:
        """Whether reloading needs hfcompress: packed modules, or shapes the config cannot express."""
        return bool(self.modules or self.pruned or self.shared)

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """The config stored in a checkpoint's ``config.json``: untrusted, so every field is checked
        (:func:`check_record`) before anything is built from it."""
        check_record(config_dict)
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
            out["pruned"] = self.pruned.to_dict()
        if self.shared:
            out["shared"] = self.shared.to_dict()
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


# A compressed model that reloads without hfcompress (uniformly pruned, nothing packed) carries no
# quantization_config; its record waits here for the model card that save_pretrained writes. A
# model holds its record in exactly one of the two places (see integration.quantizer).
PLAIN_RECORD = "_hfcompress_plain_record"


def compression_record(model) -> CompressionConfig | None:
    """What hfcompress did to ``model``: its ``config.quantization_config`` when reloading needs the
    plugin, else the record of a model that saves as a plain checkpoint; None when neither."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config if isinstance(config, CompressionConfig) else getattr(model, PLAIN_RECORD, None)


# The fields of a stored config, each with the check its value must pass. A checkpoint is untrusted
# input: a field of the wrong type, range or shape is refused here, before any module is built or
# any tensor allocated from it, and no field is ever read as a path (a recipe is stored inline).
RECORD_KEYS = ("quant_method", "format_version", "recipe", "quantized", "pruned", "shared", "base_model",
               "license", "metrics", "storage")
FORMAT_KEYS = tuple(f.name for f in fields(LinearFormat))
NAME_LIMIT = 1000  # characters in a module name; real ones are well under 200


class _Refused(Exception):
    """One refused field: where it is, and what was expected."""


def _expect(ok: bool, where: str, expected: str, value: Any) -> None:
    if not ok:
        raise _Refused(f"{where}: expected {expected}, got {shown(value)}")


def _integer(value: Any, where: str, low: int, high: int = INT_LIMIT - 1) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    _expect(ok, where, f"a whole number from {low} to {high:,}", value)


def _name(value: Any, where: str) -> None:
    _expect(isinstance(value, str) and 0 < len(value) <= NAME_LIMIT and not value.startswith(".")
            and ".." not in value and not value.endswith("."), where, "a dotted module name", value)


def _names(value: Any, where: str) -> None:
    _expect(isinstance(value, list), where, "a list of module names", value)
    for i, name in enumerate(value):
        _name(name, f"{where}[{i}]")
    _expect(len(set(value)) == len(value), where, "each module named once", value)


def _check_quantized(groups: Any) -> None:
    _expect(isinstance(groups, list), "quantized", "a list of format groups", groups)
    seen: set[str] = set()
    for i, group in enumerate(groups):
        where = f"quantized[{i}]"
        _expect(isinstance(group, dict) and set(group) <= {*FORMAT_KEYS, "modules"}
                and {"bits", "group_size", "sym", "modules"} <= set(group),
                where, f"a mapping with keys {', '.join(FORMAT_KEYS)}, modules", group)
        try:
            LinearFormat(**{key: group[key] for key in FORMAT_KEYS if key in group})
        except FormatError as err:
            _expect(False, f"{where}.{err.field}", err.expected, err.value)
        _names(group["modules"], f"{where}.modules")
        again = seen.intersection(group["modules"])
        _expect(not again, f"{where}.modules", "each module in one group", sorted(again))
        seen.update(group["modules"])


def _as_record(kind: type, value: Any):
    """A record given as its dataclass or as the mapping config.json holds (checked), or None."""
    if not value:
        return None
    if isinstance(value, kind):
        return copy.deepcopy(value)
    try:
        return kind.from_dict(value)
    except _Refused as refused:
        raise ValueError(str(refused)) from None


def _check_pruned(pruned: Any) -> None:
    _expect(isinstance(pruned, dict) and set(pruned) == {"head_dim", "layers"}, "pruned",
            "a mapping with keys head_dim, layers", pruned)
    _integer(pruned["head_dim"], "pruned.head_dim", 1)
    layers = pruned["layers"]
    _expect(isinstance(layers, list) and layers, "pruned.layers", "a list of layer sizes", layers)
    for i, sizes in enumerate(layers):
        where = f"pruned.layers[{i}]"
        _expect(isinstance(sizes, dict) and set(sizes) == {"heads", "kv_heads", "ffn"}, where,
                "a mapping with keys heads, kv_heads, ffn", sizes)
        _integer(sizes["heads"], f"{where}.heads", 1)
        _integer(sizes["kv_heads"], f"{where}.kv_heads", 1, sizes["heads"])
        _integer(sizes["ffn"], f"{where}.ffn", 0)


def _check_shared(shared: Any) -> None:
    _expect(isinstance(shared, dict) and set(shared) <= {"modules", "lora"}, "shared",
            "a mapping with keys modules, lora", shared)
    users = shared.get("modules", {})
    _expect(isinstance(users, dict), "shared.modules", "a mapping {user: owner}", users)
    for user, owner in users.items():
        _name(user, "shared.modules key")
        _name(owner, f"shared.modules[{shown(user)}]")
        _expect(owner != user and owner not in users, f"shared.modules[{shown(user)}]",
                "another module, which is not itself a user", owner)
    lora = shared.get("lora")
    if lora is not None:
        _expect(isinstance(lora, dict) and set(lora) == {"rank", "modules"}, "shared.lora",
                "a mapping with keys rank, modules", lora)
        _integer(lora["rank"], "shared.lora.rank", 1)
        _names(lora["modules"], "shared.lora.modules")


@dataclass
class PrunedRecord:
    """Per-layer sizes after structured pruning, when the model's config cannot express them
    (``config.json``: ``{"head_dim": d, "layers": [{"heads": h, "kv_heads": kv, "ffn": f}, ...]}``)."""

    head_dim: int
    layers: list[LayerSizes]

    @classmethod
    def from_dict(cls, data: Any) -> PrunedRecord:
        _check_pruned(data)
        return cls(data["head_dim"], [LayerSizes(**sizes) for sizes in data["layers"]])

    def to_dict(self) -> dict:
        return {"head_dim": self.head_dim, "layers": [sizes.to_dict() for sizes in self.layers]}


@dataclass
class LoraRecord:
    """The low-rank corrections that let each user of a shared linear differ (``rank``, wrapper names)."""

    rank: int
    modules: list[str]


@dataclass
class SharedRecord:
    """Modules used by several layers, stored once (see :mod:`hfcompress.sharing`): ``modules`` maps
    each user to its owner, the name its tensors are saved under (``config.json``:
    ``{"modules": {user: owner}, "lora": {"rank": r, "modules": [...]}}``)."""

    modules: dict[str, str] = field(default_factory=dict)
    lora: LoraRecord | None = None

    @classmethod
    def from_dict(cls, data: Any) -> SharedRecord:
        _check_shared(data)
        lora = data.get("lora")
        return cls(dict(data.get("modules", {})), LoraRecord(lora["rank"], list(lora["modules"])) if lora else None)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"modules": dict(self.modules)}
        if self.lora is not None:
            out["lora"] = {"rank": self.lora.rank, "modules": list(self.lora.modules)}
        return out


def check_record(record: Any) -> None:
    """Raise :class:`CheckpointError` unless ``record`` is a well-formed hfcompress
    ``quantization_config``: known keys, the exact format version, and every field of the type
    and range that hfcompress writes. Model-dependent checks (names that exist, sizes that fit)
    follow when the model is built, still before any weight is allocated."""
    try:
        _expect(isinstance(record, dict), "quantization_config", "a mapping", record)
        unknown = [key for key in record if key not in RECORD_KEYS]
        _expect(not unknown, "quantization_config", f"only the keys {', '.join(RECORD_KEYS)} (unknown key)", unknown)
        _expect(record.get("quant_method", QUANT_METHOD) == QUANT_METHOD, "quant_method", repr(QUANT_METHOD),
                record.get("quant_method"))
        version = record.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise CheckpointError(
                f"this checkpoint uses hfcompress format version {version}, newer than this install reads "
                f"({FORMAT_VERSION}): upgrade hfcompress (pip install -U hfcompress)")
        _expect(type(version) is int and version == FORMAT_VERSION, "format_version", str(FORMAT_VERSION), version)
        _expect(record.get("storage", QUANT_METHOD) in STORAGES, "storage", " or ".join(STORAGES), record.get("storage"))
        # Never a string: in a checkpoint a recipe is the mapping it ran, not a path to open.
        recipe = record.get("recipe")
        _expect(recipe is None or isinstance(recipe, dict), "recipe", "the recipe as a mapping (or null)", recipe)
        if recipe is not None:
            try:
                Recipe.from_dict(recipe)
            except RecipeError as err:
                raise _Refused(f"recipe: {err}") from None
        if "quantized" in record:
            _check_quantized(record["quantized"])
        if record.get("pruned"):
            PrunedRecord.from_dict(record["pruned"])
        if record.get("shared"):
            SharedRecord.from_dict(record["shared"])
        for key in ("base_model", "license"):
            value = record.get(key)
            _expect(value is None or (isinstance(value, str) and len(value) <= NAME_LIMIT), key, "a short string", value)
        metrics = record.get("metrics")
        _expect(metrics is None or (isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics)),
                "metrics", "a mapping of named metrics", metrics)
    except _Refused as refused:
        raise CheckpointError(
            f"invalid hfcompress quantization_config in config.json: {refused}; the file is corrupt or was "
            "edited: restore it or save the model again") from None


def recorded_stages(record: dict) -> list[tuple[str, dict]]:
    """``[(stage name, options as written)]`` of the recipe a record holds, for readers that
    describe it (a stage written by its name alone has no options). ``record`` has passed
    :func:`check_record`, so each stage is a name or a one-key mapping."""
    stages = (record.get("recipe") or {}).get("stages") or []
    named = [(stage, None) if isinstance(stage, str) else next(iter(stage.items())) for stage in stages]
    return [(name, options or {}) for name, options in named]
