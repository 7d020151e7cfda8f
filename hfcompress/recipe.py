"""Recipes: an ordered list of compression stages, one vocabulary in YAML, dicts and Python.

A recipe is typed, validated and closed: an unknown key, a wrong type or an out-of-range value
raises :class:`RecipeError` naming the offending key and listing what is valid. Serializing and
parsing again gives an equal object (``Recipe.from_yaml(r.to_yaml()) == r``).

>>> recipe = Recipe.from_yaml('''
... stages:
...   - quantize: {method: rtn, bits: 4, group_size: 128}
... ''')
>>> recipe.stages[0].bits, recipe.stages[0].group_size
(4, 128)
>>> Recipe.from_dict({"stages": [{"quantize": {"bits": 5}}]})
Traceback (most recent call last):
...
hfcompress.recipe.RecipeError: recipe stages[0].quantize.bits: 5 is not a valid bit width; valid: 2, 3, 4, 8
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import UserError

BIT_WIDTHS = (2, 3, 4, 8)
QUANTIZE_METHODS = ("rtn", "gptq")


class RecipeError(UserError, ValueError):
    """A recipe (YAML, dict or object) that does not validate; the message names the key."""


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Raise RecipeError unless ``value`` fits the annotation ``hint`` (a small, closed set)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, where)
            except RecipeError as err:
                errors.append(err)
        raise errors[-1]
    if hint is type(None):
        if value is not None:
            raise RecipeError(f"{where}: expected nothing (null), got {value!r}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        for i, item in enumerate(value):
            _check_type(item, typing.get_args(hint)[0], f"{where}[{i}]")
        return
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise RecipeError(f"{where}: expected {names.get(hint, hint.__name__)}, got {value!r}")


class _Section:
    """Shared parsing for recipe sections: closed keys, checked types, then ``validate``."""

    @classmethod
    def from_dict(cls, data: Any, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path}: expected a mapping of keys, got {data!r}")
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in valid:
                raise RecipeError(
                    f"recipe {_where(path, str(key))}: unknown key {key!r}; valid keys: {', '.join(valid)}"
                )
        for key, value in data.items():
            _check_type(value, hints[key], f"recipe {_where(path, key)}")
        try:
            return cls(**{k: list(v) if isinstance(v, list) else v for k, v in data.items()})
        except RecipeError as err:
            raise RecipeError(f"recipe {_where(path, str(err))}") from None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check values; raise ``RecipeError("<key>: <problem>")`` (the caller adds the path)."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass
class CalibrationConfig(_Section):
    """Calibration text for data-driven stages: a file, a folder of .txt files or a datasets name."""

    data: str | None = None
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    dtype: str | None = None  # compute dtype of calibration forwards and Hessians (None: the model's)

    DTYPES: ClassVar[tuple[str, ...]] = ("float32", "bfloat16", "float16")

    def validate(self):
        for key in ("samples", "seq_len"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"{key}: {getattr(self, key)} must be positive")
        if self.dtype is not None and self.dtype not in self.DTYPES:
            raise RecipeError(f"dtype: {self.dtype!r} is not a compute dtype; valid: {', '.join(self.DTYPES)}")


@dataclass
class QuantizeStage(_Section):
    """``quantize``: weight-only integer quantization of the linear layers.

    ``lm_head: true`` also quantizes the output projection (if it is tied to the input
    embeddings, the tie is broken: the embeddings stay in float). The keys after ``ignore``
    apply to ``method: gptq`` only (see ``hfcompress.quantization.gptq``).
    """

    name: ClassVar[str] = "quantize"
    GPTQ_KEYS: ClassVar[tuple[str, ...]] = (
        "act_order", "static_groups", "damp", "shrink", "block_size", "mse", "true_sequential")

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    lm_head: bool = False
    ignore: list[str] = field(default_factory=list)
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    shrink: float = 0.5
    block_size: int = 128
    mse: bool = False
    # Off by default: on SmolLM2 4-bit g64 it cost 1.5x the time and 0.45 GB more memory for no
    # gain (first 20 WikiText-2 windows: 25.91 with it, 25.75 without).
    true_sequential: bool = False

    def validate(self):
        if self.method not in QUANTIZE_METHODS:
            raise RecipeError(f"method: {self.method!r} is not a method we have; valid: {', '.join(QUANTIZE_METHODS)}")
        if self.bits not in BIT_WIDTHS:
            raise RecipeError(f"bits: {self.bits} is not a valid bit width; valid: {', '.join(map(str, BIT_WIDTHS))}")
        if self.group_size != -1 and self.group_size <= 0:
            raise RecipeError(
                f"group_size: {self.group_size} is not valid; use -1 (one group per row) or a positive size"
            )
        if not 0 < self.damp < 1:
            raise RecipeError(f"damp: {self.damp} must lie in (0, 1): a fraction of the Hessian's mean diagonal")
        if not 0 <= self.shrink <= 1:
            raise RecipeError(f"shrink: {self.shrink} must lie in [0, 1] (0: the paper's GPTQ, 1: rounding)")
        if self.block_size <= 0:
            raise RecipeError(f"block_size: {self.block_size} must be positive")
        if self.method != "gptq":
            defaults = QuantizeStage.__dataclass_fields__
            for key in self.GPTQ_KEYS:
                if getattr(self, key) != defaults[key].default:
                    raise RecipeError(f"{key}: applies to method gptq only, not {self.method!r}")


# The stage vocabulary: YAML name -> config class. New stages register here.
STAGES: dict[str, type[_Section]] = {cls.name: cls for cls in (QuantizeStage,)}

Stage = QuantizeStage


def _parse_stage(item: Any, path: str) -> Stage:
    if isinstance(item, str):
        item = {item: None}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            f"recipe {path}: a stage is a mapping with one key, the stage name (one of: {', '.join(STAGES)}); "
            f"got {item!r}"
        )
    (name, params), = item.items()
    if name not in STAGES:
        raise RecipeError(f"recipe {path}: unknown stage {name!r}; valid stages: {', '.join(STAGES)}")
    return STAGES[name].from_dict(params, f"{path}.{name}")


@dataclass
class Recipe:
    """An ordered list of stages and, for data-driven stages, the calibration data."""

    stages: list[Stage] = field(default_factory=list)
    calibration: CalibrationConfig | None = None

    KEYS: ClassVar[tuple[str, ...]] = ("calibration", "stages")

    def __post_init__(self):
        if not self.stages:
            raise RecipeError("recipe stages: a recipe needs at least one stage; valid stages: " + ", ".join(STAGES))
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, tuple(STAGES.values())):
                raise RecipeError(f"recipe stages[{i}]: {stage!r} is not a stage; valid stages: {', '.join(STAGES)}")

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a mapping with keys {', '.join(cls.KEYS)}, got {data!r}")
        for key in data:
            if key not in cls.KEYS:
                raise RecipeError(f"recipe {key}: unknown key {key!r}; valid keys: {', '.join(cls.KEYS)}")
        stages = data.get("stages")
        if not isinstance(stages, list):
            raise RecipeError(f"recipe stages: expected a list of stages, got {stages!r}")
        calibration = data.get("calibration")
        return cls(
            stages=[_parse_stage(item, f"stages[{i}]") for i, item in enumerate(stages)],
            calibration=None if calibration is None else CalibrationConfig.from_dict(calibration, "calibration"),
        )

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        out["stages"] = [{stage.name: stage.to_dict()} for stage in self.stages]
        return out

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe: not valid YAML: {err}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, source: Recipe | dict | str | os.PathLike) -> Recipe:
        """A recipe from an object, a dict, a YAML file path, or the name of a bundled recipe."""
        if isinstance(source, Recipe):
            return source
        if isinstance(source, dict):
            return cls.from_dict(source)
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if path.is_file():
                return cls.from_yaml(path.read_text(encoding="utf-8"))
            bundled = bundled_recipes()
            if str(source) in bundled:
                return cls.from_yaml(bundled[str(source)].read_text(encoding="utf-8"))
            raise RecipeError(
                f"recipe {str(source)!r} is neither a YAML file nor a bundled recipe; bundled: {', '.join(bundled)}"
            )
        raise RecipeError(f"recipe: expected a Recipe, a dict or a YAML path, got {type(source).__name__}")


def bundled_recipes() -> dict[str, Any]:
    """Recipes shipped with the package (the repository's ``recipes/`` folder), by name."""
    folder = importlib.resources.files("hfcompress.recipes")
    return {p.name.removesuffix(".yaml"): p for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")}
