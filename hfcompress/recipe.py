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
import math
import os
import reprlib
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .errors import UserError
from .linear_format import SUPPORTED_BITS, LinearFormat
from .patterns import matches

BIT_WIDTHS = SUPPORTED_BITS  # what the packing and the kernels handle
QUANTIZE_METHODS = ("rtn", "gptq", "awq")


class RecipeError(UserError, ValueError):
    """A recipe (YAML, dict or object) that does not validate; the message names the key."""


class _RecipeLoader(yaml.SafeLoader):
    """Safe YAML without aliases and without duplicate keys.

    An alias re-uses a node, so a few hundred bytes of nested aliases expand to billions of
    values ("billion laughs"); a recipe is short enough to write out. A repeated key would
    silently mean its last value (``{bits: 4, bits: 2}`` is 2 bits).
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise RecipeError(f"recipe line {event.start_mark.line + 1}: YAML aliases (*{shown(event.anchor)[1:-1]}) "
                              "are not allowed in recipes; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise RecipeError(f"recipe line {key_node.start_mark.line + 1}: key {shown(key)} appears twice in "
                                  "one mapping; keep one")
            if isinstance(key, str):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6
_SHOWN.maxlevel = 3


def shown(value: Any) -> str:
    """``repr(value)`` cut short: an error message quotes what it refuses, never all of it."""
    return _SHOWN.repr(value)


# Integers a recipe may hold: sizes, counts and indices, far below this; larger is a typo or an attack.
INT_LIMIT = 2**31


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Raise RecipeError unless ``value`` fits the annotation ``hint`` (a small, closed set)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        # A value that is given failed as the value it could be, not as null: say that.
        for option in [o for o in typing.get_args(hint) if value is None or o is not type(None)]:
            try:
                return _check_type(value, option, where)
            except RecipeError as err:
                errors.append(err)
        raise errors[-1]
    if hint is type(None):
        if value is not None:
            raise RecipeError(f"{where}: expected nothing (null), got {shown(value)}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {shown(value)}")
        for i, item in enumerate(value):
            _check_type(item, typing.get_args(hint)[0], f"{where}[{i}]")
        return
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise RecipeError(f"{where}: expected {names.get(hint, hint.__name__)}, got {shown(value)}")
    if hint is float and not math.isfinite(value):
        raise RecipeError(f"{where}: expected a finite number, got {value}")
    if hint in (int, float) and abs(value) >= INT_LIMIT:
        raise RecipeError(f"{where}: {shown(value)} is out of range (at most {INT_LIMIT - 1:,} in size)")


class _Section:
    """Shared parsing for recipe sections: closed keys, checked types, then ``validate``."""

    @classmethod
    def from_dict(cls, data: Any, path: str = ""):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path}: expected a mapping of keys, got {shown(data)}")
        hints = typing.get_type_hints(cls)
        valid = [f.name for f in dataclasses.fields(cls)]
        data = cls._renamed(data, path)
        for key in data:
            if key not in valid:
                raise RecipeError(
                    f"recipe {_where(path, str(key))}: unknown key {shown(key)}; valid keys: {', '.join(valid)}"
                )
        values = {}
        for key, value in data.items():
            hint = hints[key]
            section = _section_of(hint)
            if section is not None and (value is not None or hint is section):  # a nested section, e.g. distill.loss
                values[key] = value if isinstance(value, section) else section.from_dict(value, _where(path, key))
                continue
            items = _list_of_sections(hint)
            if items is not None:  # a list of sections, e.g. quantize.overrides
                _check_type(value, list, f"recipe {_where(path, key)}")
                values[key] = [v if isinstance(v, items) else items.from_dict(v, f"{_where(path, key)}[{i}]")
                               for i, v in enumerate(value)]
                continue
            _check_type(value, hint, f"recipe {_where(path, key)}")
            values[key] = [list(v) if isinstance(v, list) else v for v in value] if isinstance(value, list) else value
        try:
            return cls(**values)
        except RecipeError as err:
            raise RecipeError(f"recipe {_where(path, str(err))}") from None

    # Keys read under an older name: {old: new}. Recipes stored in saved checkpoints keep loading.
    RENAMED: ClassVar[dict[str, str]] = {}

    @classmethod
    def _renamed(cls, data: dict, path: str) -> dict:
        for old, new in cls.RENAMED.items():
            if old in data:
                if new in data:
                    raise RecipeError(f"recipe {_where(path, old)}: {old!r} is the old name of {new!r}; give only {new!r}")
                warnings.warn(f"recipe {_where(path, old)}: {old!r} is now called {new!r}", FutureWarning, stacklevel=4)
                data = {new if key == old else key: value for key, value in data.items()}
        return data

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check values; raise ``RecipeError("<key>: <problem>")`` (the caller adds the path)."""

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _section_of(hint: Any) -> type | None:
    """The section class of ``Section`` or ``Section | None`` annotations."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if isinstance(option, type) and issubclass(option, _Section):
            return option
    return None


def _list_of_sections(hint: Any) -> type | None:
    """The section class of ``list[Section]`` annotations."""
    if typing.get_origin(hint) is list:
        return _section_of(typing.get_args(hint)[0])
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass
class CalibrationConfig(_Section):
    """Calibration text for data-driven stages: a file, a folder of .txt files or a datasets name."""

    data: str | None = None
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    # What calibration forwards and Hessians compute in (the name evaluate_perplexity and
    # --compute-dtype use too). auto: the model's own dtype where the device computes it natively,
    # else float32 (a bfloat16 model on a CPU without bf16 instructions); null: the model's own, always.
    compute_dtype: str | None = "auto"

    DTYPES: ClassVar[tuple[str, ...]] = ("auto", "float32", "bfloat16", "float16")
    RENAMED: ClassVar[dict[str, str]] = {"dtype": "compute_dtype"}

    def validate(self):
        for key in ("samples", "seq_len"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"{key}: {getattr(self, key)} must be positive")
        if self.compute_dtype is not None and self.compute_dtype not in self.DTYPES:
            raise RecipeError(f"compute_dtype: {shown(self.compute_dtype)} is not a compute dtype; "
                              f"valid: {', '.join(self.DTYPES)}")


@dataclass
class ExpertsOptions(_Section):
    """How GPTQ calibrates the experts of MoE layers (``quantize.experts``)."""

    calibrate_all: bool = False  # every calibration token through every expert (only routed outputs move on)
    min_tokens: int = 16  # an expert routed fewer tokens is rounded to nearest (RTN), and the log says so

    def validate(self):
        if self.min_tokens < 0:
            raise RecipeError(f"min_tokens: {self.min_tokens} must be >= 0")


@dataclass
class EmbeddingOptions(_Section):
    """Quantize the input embedding table too (``quantize.embeddings``): one packed table for the
    lookup and, when tied, the output projection."""

    bits: int = 8
    group_size: int = 128
    sym: bool = True

    def validate(self):
        if self.bits not in (4, 8):
            raise RecipeError(f"bits: {self.bits} is not valid for an embedding table; valid: 4, 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise RecipeError(f"group_size: {self.group_size} is not valid; use -1 (one group per row) or a positive size")


@dataclass
class FormatOverride(_Section):
    """One entry of ``quantize.overrides``: the modules it names (glob patterns, as ``ignore``
    takes them) get this bit width and group size instead of the stage's. Later entries win
    over earlier ones; ``hfcompress plan`` writes one entry per format it chose."""

    modules: list[str] = field(default_factory=list)
    bits: int | None = None
    group_size: int | None = None

    def validate(self):
        if not self.modules:
            raise RecipeError("modules: name at least one module (a glob pattern such as model.layers.3.mlp.*)")
        if self.bits is not None and self.bits not in BIT_WIDTHS:
            raise RecipeError(f"bits: {self.bits} is not a valid bit width; valid: {', '.join(map(str, BIT_WIDTHS))}")
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise RecipeError(f"group_size: {self.group_size} is not valid; use -1 (one group per row) or a positive size")


@dataclass
class QuantizeStage(_Section):
    """``quantize``: weight-only integer quantization of the linear layers.

    ``lm_head: true`` also quantizes the output projection (if it is tied to the input
    embeddings and ``embeddings`` is not set, the tie is broken: the embeddings stay in float).
    Only the language model is quantized: ``include`` names modules outside it (a vision tower)
    to quantize too; MoE routers stay in float unless ``routers: true``. ``strict: true`` fails
    when more than 10% of the decoder's linear and expert weights would stay in float (else a
    warning names them). The keys from ``act_order`` on apply to ``method: gptq`` only (see
    ``hfcompress.quantization.gptq``). ``overrides`` give some modules another bit width or group
    size (a mixed-precision plan, see :mod:`hfcompress.planning`)::

        quantize: {method: gptq, bits: 3, group_size: 64,
                   overrides: [{modules: [model.layers.0.mlp.down_proj], bits: 4}]}
    """

    name: ClassVar[str] = "quantize"
    GPTQ_KEYS: ClassVar[tuple[str, ...]] = (
        "act_order", "static_groups", "damp", "shrink", "block_size", "mse", "mse_step", "mse_grow", "true_sequential",
        "asymmetric", "asymmetric_damp", "refit", "hessian_dtype", "tune", "tune_lr", "tune_norms", "tune_codes",
        "tune_target")

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    lm_head: bool = False
    ignore: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    routers: bool = False
    strict: bool = False
    embeddings: EmbeddingOptions | None = None
    experts: ExpertsOptions = field(default_factory=ExpertsOptions)
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    shrink: float = 0.5
    block_size: int = 128
    mse: bool = False
    # The clipping search measures every mse_step-th of its 80 ranges, then those around each row's
    # best (1: all of them; 4: a third of the search's time).
    mse_step: int = 1
    # The widest range the clipping search tries, a multiple of the group's full range. A symmetric
    # grid has one level more below zero than above (3 bits: -4..3 steps), so the full range clips
    # a group's largest positive weight to 6/7 of it; 7/6 lets the top level reach it.
    mse_grow: float = 1.0
    # Off by default: on a chained model it runs all windows through a block in one call, holding
    # that block's activations for every window at once (SmolLM2, 32 x 2048 tokens: +1.6 GB), and
    # plain GPTQ gained nothing from the order (first 20 WikiText-2 windows: 25.91 with it, 25.75
    # without, measured with the earlier pass per group). With asymmetric calibration it saves a
    # forward per window (rotate+GPTAQ on SmolLM2: 523 s against 647 s, 25.508 against 25.598).
    true_sequential: bool = False
    asymmetric: float = 0.0  # GPTAQ: 0 calibrates each layer on its own inputs, 1 against the float model's outputs
    # A ridge on asymmetric calibration's correction alone, W* = W + W (C - H) (H + ridge)^-1, as a
    # fraction of H's mean diagonal (default: none, W* = W C (H + damp)^-1): a larger one keeps the
    # correction to the directions the sample spans well, shrinking toward no correction.
    asymmetric_damp: float | None = None
    refit: bool = False  # least-squares group scales for the codes GPTQ chose
    # What the Hessians' and cross products' matrix products compute in (null: the calibration's
    # compute_dtype). bfloat16 halves their time on CPUs with bf16 dot products while the forwards
    # stay float32 (they carry the small float-quantized differences of asymmetric calibration);
    # auto: bfloat16 where the device multiplies it natively, else null.
    hessian_dtype: str | None = None
    tune: int = 0  # epochs of block-wise tuning of the group scales to each block's output (block_tuning.py)
    tune_lr: float = 1e-3  # Adam's learning rate for the scales' logarithms (cosine schedule)
    tune_norms: bool = False  # the block's norm weights (kept in float) train with the scales
    tune_codes: bool = False  # each code may move one grid step while the scales train (rounding learned)
    # How far tuning's target moves from the float block's output on the quantized stream toward the
    # float model's own output (None: as far as asymmetric moves each layer's GPTQ target).
    tune_target: float | None = None
    awq: bool = False  # gptq only: fold AWQ's activation-aware scales in first (method awq: AWQ + rounding)
    overrides: list[FormatOverride] = field(default_factory=list)

    def format_of(self, name: str | None) -> tuple[int, int]:
        """``(bits, group_size)`` for module ``name``: the last override naming it, else (and for
        ``None``) the stage's."""
        bits, group_size = self.bits, self.group_size
        for override in self.overrides if name is not None else ():
            if matches(name, override.modules):
                bits = override.bits if override.bits is not None else bits
                group_size = override.group_size if override.group_size is not None else group_size
        return bits, group_size

    def linear_format(self, name: str | None, rounded: bool = False) -> LinearFormat:
        """How module ``name`` is stored: its bits and group size, the stage's symmetry, and
        act-order where GPTQ permutes columns at inference (not with static groups, nor for a
        module ``rounded`` to nearest, whose columns keep their order)."""
        bits, group_size = self.format_of(name)
        act_order = self.method == "gptq" and self.act_order and not self.static_groups and not rounded
        return LinearFormat(bits=bits, group_size=group_size, sym=self.sym, act_order=act_order)

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")

    @property
    def tune_toward_float(self) -> float:
        """The fraction of the way to the float model's output that block-wise tuning fits."""
        return self.asymmetric if self.tune_target is None else self.tune_target

    @property
    def float_stream(self) -> bool:
        """Whether GPTQ runs the float model's stream beside the quantized one (asymmetric
        calibration, or a tuning target that moves toward the float model's output)."""
        return bool(self.asymmetric or (self.tune and self.tune_toward_float))

    def validate(self):
        if self.method not in QUANTIZE_METHODS:
            raise RecipeError(f"method: {shown(self.method)} is not a method we have; valid: {', '.join(QUANTIZE_METHODS)}")
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
        if not 0 <= self.asymmetric <= 1:
            raise RecipeError(f"asymmetric: {self.asymmetric} must lie in [0, 1] (0: plain GPTQ, 1: match the float "
                              "model's outputs)")
        if self.asymmetric_damp is not None:
            if not self.asymmetric:
                raise RecipeError("asymmetric_damp: sets asymmetric calibration's ridge; set asymmetric: as well")
            if not 0 < self.asymmetric_damp <= 100:
                raise RecipeError(f"asymmetric_damp: {shown(self.asymmetric_damp)} must lie in (0, 100]: a fraction of "
                                  "the Hessian's mean diagonal")
        if isinstance(self.mse_step, bool) or not isinstance(self.mse_step, int) or self.mse_step < 1:
            raise RecipeError(f"mse_step: {shown(self.mse_step)} must be a whole number, 1 (every range) or more")
        if self.mse_step > 1 and not self.mse:
            raise RecipeError("mse_step: sets the clipping search's stride; set mse: true as well")
        if not 1 <= self.mse_grow <= 2:  # its type is checked with every key's
            raise RecipeError(f"mse_grow: {shown(self.mse_grow)} must lie in [1, 2]: the widest range the clipping "
                              "search tries, a multiple of the group's full range")
        if self.mse_grow != 1 and not self.mse:
            raise RecipeError("mse_grow: widens the clipping search; set mse: true as well")
        if self.hessian_dtype is not None and self.hessian_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise RecipeError(f"hessian_dtype: {shown(self.hessian_dtype)} is not a dtype for GPTQ's products; valid: "
                              "auto, float32, bfloat16, float16 (or leave it out: the calibration's compute_dtype)")
        if self.tune < 0:
            raise RecipeError(f"tune: {self.tune} must be a number of epochs, 0 (no tuning) or more")
        if self.tune and self.true_sequential:
            raise RecipeError("tune: block-wise scale tuning runs with true_sequential: false; set one of them off")
        for key in ("tune_norms", "tune_codes"):
            if getattr(self, key) and not self.tune:
                raise RecipeError(f"{key}: true trains with the scales; set tune: (epochs) as well")
        if self.tune_target is not None:
            if not self.tune:
                raise RecipeError("tune_target: sets block-wise tuning's target; set tune: (epochs) as well")
            if isinstance(self.tune_target, bool) or not 0 <= self.tune_target <= 1:
                raise RecipeError(f"tune_target: {shown(self.tune_target)} must lie in [0, 1] (0: the float block's "
                                  "output on the quantized stream, 1: the float model's own output)")
        if not self.tune_lr > 0:
            raise RecipeError(f"tune_lr: {self.tune_lr} must be positive (a learning rate, 1e-3 by default)")
        if self.block_size <= 0:
            raise RecipeError(f"block_size: {self.block_size} must be positive")
        if self.awq and self.method != "gptq":
            raise RecipeError(f"awq: true applies to method gptq (AWQ's scales, then GPTQ); method: awq is AWQ's scales "
                              f"then rounding, and {shown(self.method)} takes no awq key")
        if self.method != "gptq":
            defaults = QuantizeStage.__dataclass_fields__
            for key in self.GPTQ_KEYS:
                if getattr(self, key) != defaults[key].default:
                    raise RecipeError(f"{key}: applies to method gptq only, not {shown(self.method)}")


def _check_amount(key: str, value: float | int, what: str) -> None:
    """A pruning amount: a fraction in [0, 1) as a float, or a count as an integer."""
    if isinstance(value, bool):
        raise RecipeError(f"{key}: expected a fraction or a count, got {shown(value)}")
    if isinstance(value, int):
        if value < 0:
            raise RecipeError(f"{key}: {value} must be a count of {what} to remove (>= 0)")
    elif not 0 <= value < 1:
        hint = " (all of them)" if value == 1 else ""
        raise RecipeError(
            f"{key}: a fraction of {value}{hint} is not valid; write a fraction of the {what} to remove in "
            f"[0, 1), or an integer count"
        )


@dataclass
class PruneOverride(_Section):
    """One entry of ``prune.overrides``: decoder layers (0-based, as in the model) that remove
    other amounts of heads or FFN channels than the stage's. Later entries win over earlier ones;
    ``hfcompress plan --prune`` writes one entry per amount it chose."""

    layers: list[int] = field(default_factory=list)
    heads: float | int | None = None
    ffn: float | int | None = None

    def validate(self):
        if not self.layers:
            raise RecipeError("layers: name at least one decoder layer by its index (0 is the first)")
        if any(i < 0 for i in self.layers):
            raise RecipeError(f"layers: {self.layers} holds a negative index; decoder layers count from 0")
        if self.heads is None and self.ffn is None:
            raise RecipeError("give heads or ffn (or both): the amounts these layers remove")
        if self.heads is not None:
            _check_amount("heads", self.heads, "attention heads")
        if self.ffn is not None:
            _check_amount("ffn", self.ffn, "FFN channels")


@dataclass
class PruneStage(_Section):
    """``prune``: structured pruning of attention heads, FFN channels, hidden channels and layers.

    Amounts are a fraction of what each layer has (a float below 1) or a count to remove (an
    integer): ``heads: 0.3334`` or ``heads: 3``. ``layers`` counts whole decoder layers to drop.
    See :mod:`hfcompress.pruning` for the importance measures and the GQA modes.
    """

    name: ClassVar[str] = "prune"
    IMPORTANCE: ClassVar[tuple[str, ...]] = ("activation", "magnitude", "taylor")
    GQA: ClassVar[tuple[str, ...]] = ("groups", "per_group")

    heads: float | int = 0
    ffn: float | int = 0
    hidden: float | int = 0
    layers: int = 0
    experts: float | int = 0  # experts of every MoE layer, the least routed-to first
    importance: str = "activation"
    gqa: str = "groups"
    uniform: bool = True
    scores: str | None = None  # a .safetensors file: reused when it exists, written when it does not
    overrides: list[PruneOverride] = field(default_factory=list)  # other amounts for some layers

    def amounts(self, layer: int) -> tuple[float | int, float | int]:
        """``(heads, ffn)`` that decoder layer ``layer`` removes: the last override naming it, else the stage's."""
        heads, ffn = self.heads, self.ffn
        for override in self.overrides:
            if layer in override.layers:
                heads = override.heads if override.heads is not None else heads
                ffn = override.ffn if override.ffn is not None else ffn
        return heads, ffn

    @property
    def needs_calibration(self) -> bool:
        return self.importance != "magnitude" or self.layers > 0 or bool(self.experts)

    def validate(self):
        _check_amount("heads", self.heads, "attention heads")
        _check_amount("ffn", self.ffn, "FFN channels")
        _check_amount("hidden", self.hidden, "hidden channels")
        _check_amount("experts", self.experts, "experts")
        if self.layers < 0:
            raise RecipeError(f"layers: {self.layers} must be a count of decoder layers to remove (>= 0)")
        if self.importance not in self.IMPORTANCE:
            raise RecipeError(f"importance: {shown(self.importance)} is not a measure we have; valid: {', '.join(self.IMPORTANCE)}")
        if self.gqa not in self.GQA:
            raise RecipeError(f"gqa: {shown(self.gqa)} is not a GQA mode; valid: {', '.join(self.GQA)}")
        if self.overrides and not self.uniform:
            raise RecipeError("overrides: set each layer's own amount, where uniform: false ranks units across layers; "
                              "use one or the other")


@dataclass
class DistillLoss(_Section):
    """Weights of the distillation loss terms (see ``hfcompress.distillation``)."""

    kl: float = 1.0  # divergence of the next-token distributions
    ce: float = 0.0  # cross-entropy on the text itself
    hidden: float = 0.0  # hidden-state MSE over layer_map
    attention: float = 0.0  # attention-map KL over layer_map (eager attention)

    def validate(self):
        check_loss_weights(self.kl, self.ce, self.hidden, self.attention)


DIVERGENCES = ("forward", "reverse", "jsd")  # of the next-token distributions; see distillation/losses.py


def check_loss_weights(kl: float, ce: float, hidden: float, attention: float) -> None:
    """The distillation loss weights, for the recipe and for ``DistillationTrainingArguments`` alike."""
    if min(kl, ce, hidden, attention) < 0 or not any((kl, ce, hidden, attention)):
        raise RecipeError("loss: weights must be >= 0 and at least one positive (kl, ce, hidden, attention)")


def check_divergence(divergence: str, temperature: float, beta: float = 0.5) -> None:
    if divergence not in DIVERGENCES:
        raise RecipeError(f"divergence: {shown(divergence)} is not valid; valid: {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        raise RecipeError(f"temperature: {temperature} must be positive")
    if not 0 <= beta <= 1:
        raise RecipeError(f"beta: {beta} must lie in [0, 1] (jsd: 0 is forward KL, 1 reverse KL, as in TRL's GKD)")


@dataclass
class DistillStage(_Section):
    """``distill``: train the model (the student) to match a teacher, with ``DistillationTrainer``.

    ``teacher: original`` is the model as it entered the recipe (kept in memory), else a local
    path or a Hub id. ``data``: a text file or folder, or a ``datasets`` name (default: the
    recipe's calibration text). Blocks of ``seq_len`` tokens, ``batch_size`` blocks per step.

    ``train`` says what learns: ``weights`` (every parameter; the default before quantize),
    ``scales`` (the group scales and zero points of packed layers, which stay packed: the default
    after quantize, quantization-aware distillation), ``codes`` (each packed code may move one grid
    step: the rounding, learned end to end), ``norms`` (the normalization weights) and
    ``lora`` (LoRA adapters of rank ``lora_rank`` on every linear layer, needs peft; merged at the
    end, and after quantize the merged weights are quantized again by the recipe's quantize
    stage). With ``scales`` the learning rate is a relative step (scales train as their logarithm).
    """

    name: ClassVar[str] = "distill"
    TRAINABLE: ClassVar[tuple[str, ...]] = ("weights", "scales", "codes", "norms", "lora")

    teacher: str = "original"
    data: str | None = None
    steps: int = 100
    seq_len: int = 512
    batch_size: int = 8
    gradient_accumulation: int = 1
    lr: float = 1e-4
    warmup: float = 0.05  # fraction of the steps with a linearly rising learning rate (then cosine decay)
    temperature: float = 2.0
    divergence: str = "forward"
    beta: float = 0.5  # jsd only: the generalized JSD's interpolation (TRL GKD's beta)
    loss: DistillLoss = field(default_factory=DistillLoss)
    layer_map: list[list[int]] | None = None  # [[student, teacher], ...] hidden-state indices
    dtype: str | None = None  # bfloat16: mixed-precision training
    train: list[str] | None = None  # weights, scales, codes, norms, lora; default: weights, or scales once quantized
    lora_rank: int = 16  # train: lora only (alpha is twice the rank)

    @property
    def needs_calibration(self) -> bool:
        return True  # training text, through the model's tokenizer

    def validate(self):
        for key in ("steps", "seq_len", "batch_size", "gradient_accumulation", "lora_rank"):
            if getattr(self, key) <= 0:
                raise RecipeError(f"{key}: {getattr(self, key)} must be positive")
        if not 0 < self.lr < 1:
            raise RecipeError(f"lr: {self.lr} must lie in (0, 1)")
        if not 0 <= self.warmup < 1:
            raise RecipeError(f"warmup: {self.warmup} must lie in [0, 1): a fraction of the steps")
        check_divergence(self.divergence, self.temperature, self.beta)
        if self.dtype not in (None, "bfloat16", "float16"):
            raise RecipeError(f"dtype: {shown(self.dtype)} is not a training precision; valid: bfloat16, float16 (or null)")
        for pair in self.layer_map or []:
            if len(pair) != 2 or min(pair) < 0:
                raise RecipeError(f"layer_map: {shown(pair)} is not a [student, teacher] pair of layer indices")
        if self.train is not None:
            if not self.train or len(set(self.train)) != len(self.train) or not set(self.train) <= set(self.TRAINABLE):
                raise RecipeError(f"train: {shown(self.train)} is not valid; a non-empty list of distinct parts from: "
                                  f"{', '.join(self.TRAINABLE)}")
            if "weights" in self.train and len(self.train) > 1:
                raise RecipeError("train: weights already trains every parameter; give it alone")


@dataclass
class ShareStage(_Section):
    """``share``: weight sharing; tied embeddings and decoder layers that share weights.

    ``tie_embeddings`` ties the input embeddings and ``lm_head`` (``input``: both take the input
    embeddings, ``output``: both take ``lm_head``, ``mean``: their average). ``layers`` lists groups
    of decoder layers (``[[0, 1], [2, 3]]``), or ``every: k`` groups each k adjacent layers; the
    ``parts`` of each group (``attention``, ``mlp``) become one set of weights, initialized from the
    group's mean (``init: mean``) or from one member (``init: 0`` for the first of each group).
    ``lora_rank > 0`` gives every layer a low-rank correction of its own on top of the shared
    weights (relaxed sharing), starting at zero. See :mod:`hfcompress.sharing`.
    """

    name: ClassVar[str] = "share"
    TIES: ClassVar[tuple[str, ...]] = ("input", "output", "mean")
    PARTS: ClassVar[tuple[str, ...]] = ("attention", "mlp")

    tie_embeddings: str | None = None
    layers: list[list[int]] | None = None
    every: int = 0
    parts: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    init: str | int = "mean"
    lora_rank: int = 0

    @property
    def needs_calibration(self) -> bool:
        return False

    def validate(self):
        if self.tie_embeddings is not None and self.tie_embeddings not in self.TIES:
            raise RecipeError(f"tie_embeddings: {shown(self.tie_embeddings)} is not valid; valid: {', '.join(self.TIES)}")
        if self.layers is not None and self.every:
            raise RecipeError("layers: give either explicit groups (layers) or a group size (every), not both")
        if self.every < 0 or self.every == 1:
            raise RecipeError(f"every: {self.every} is not a group size; use 2 or more adjacent layers per group")
        if self.tie_embeddings is None and self.layers is None and not self.every:
            raise RecipeError("share: nothing to share; set tie_embeddings, layers or every")
        seen: dict[int, int] = {}
        for i, group in enumerate(self.layers or []):
            if len(group) < 2:
                raise RecipeError(f"layers: group {shown(group)} has fewer than two layers; a group shares among 2 or more")
            for layer in group:
                if layer < 0:
                    raise RecipeError(f"layers: {layer} is not a layer index (layers count from 0)")
                if layer in seen:
                    where = "twice in the same group" if seen[layer] == i else f"in groups {seen[layer]} and {i}"
                    raise RecipeError(f"layers: layer {layer} appears {where}; groups must not overlap")
                seen[layer] = i
        if not self.parts or len(set(self.parts)) != len(self.parts) or not set(self.parts) <= set(self.PARTS):
            raise RecipeError(f"parts: {shown(self.parts)} is not valid; a non-empty list of distinct parts from: "
                              f"{', '.join(self.PARTS)}")
        if isinstance(self.init, str) and self.init != "mean":
            raise RecipeError(f"init: {shown(self.init)} is not valid; use mean, or the position of one group member (0, 1, ...)")
        if isinstance(self.init, int) and self.init < 0:
            raise RecipeError(f"init: {self.init} is not a position in a group (0 is the first member)")
        if self.lora_rank < 0:
            raise RecipeError(f"lora_rank: {self.lora_rank} must be 0 (strict sharing) or a positive rank")


# The stage vocabulary: YAML name -> config class. New stages register here.
@dataclass
class RotateStage(_Section):
    """``rotate``: an orthogonal rotation of the residual stream folded into the weights (QuaRot),
    with the norms' scales folded into the linears after them first: the same architecture and
    function, with the outliers spread over all channels, which quantizes better. ``method``:
    ``hadamard`` (randomized Hadamard; a random orthogonal matrix where the hidden size has no
    Hadamard matrix here) or ``random`` (random orthogonal); ``heads: true`` also rotates each
    attention head's values and the output projection's columns. Comes before share and quantize.
    See :mod:`hfcompress.rotation`.
    """

    name: ClassVar[str] = "rotate"
    METHODS: ClassVar[tuple[str, ...]] = ("hadamard", "random")

    method: str = "hadamard"
    seed: int = 0
    heads: bool = True

    @property
    def needs_calibration(self) -> bool:
        return False

    def validate(self):
        if self.method not in self.METHODS:
            raise RecipeError(f"method: {shown(self.method)} is not a rotation; valid: {', '.join(self.METHODS)}")


STAGES: dict[str, type[_Section]] = {cls.name: cls for cls in (
    RotateStage, PruneStage, DistillStage, ShareStage, QuantizeStage)}

Stage = RotateStage | PruneStage | DistillStage | ShareStage | QuantizeStage


def _parse_stage(item: Any, path: str) -> Stage:
    if isinstance(item, str):
        item = {item: None}
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            f"recipe {path}: a stage is a mapping with one key, the stage name (one of: {', '.join(STAGES)}); "
            f"got {shown(item)}"
        )
    (name, params), = item.items()
    if name not in STAGES:
        raise RecipeError(f"recipe {path}: unknown stage {shown(name)}; valid stages: {', '.join(STAGES)}")
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
                raise RecipeError(f"recipe stages[{i}]: {shown(stage)} is not a stage; valid stages: {', '.join(STAGES)}")
        # The order rules, in one place and checked here, so that a misordered recipe fails before
        # the stages before the misplaced one have run.
        quantize = next((i for i, stage in enumerate(self.stages) if stage.name == "quantize"), len(self.stages))
        for i in range(quantize + 1, len(self.stages)):
            after = self.stages[i]
            if after.name != "distill":
                raise RecipeError(f"recipe stages[{i}]: {after.name} after quantize; quantize comes once, followed "
                                  "only by distill stages (packed layers do not prune, share or quantize again): move it")
            if after.train is not None and "weights" in after.train:
                raise RecipeError(f"recipe stages[{i}]: distill after quantize cannot train weights (they are packed "
                                  "integers); train: [scales] (and norms) heals the quantized model")
        rotated = [i for i, stage in enumerate(self.stages) if stage.name == "rotate"]
        later = next((i for i, stage in enumerate(self.stages) if stage.name in ("share", "quantize")), None)
        if rotated and later is not None and rotated[-1] > later:
            raise RecipeError(f"recipe stages[{rotated[-1]}]: rotate after {self.stages[later].name}; the rotation folds "
                              "each layer's norms into its own linears (shared or packed ones cannot take it): put "
                              "rotate before share and quantize")
        shared = next((i for i, stage in enumerate(self.stages) if stage.name == "share"
                       and (stage.layers is not None or stage.every)), None)
        pruned = [i for i, stage in enumerate(self.stages) if stage.name == "prune"]
        if shared is not None and pruned and pruned[-1] > shared:
            raise RecipeError(f"recipe stages[{pruned[-1]}]: prune after share; layers that share weights would be "
                              "pruned differently: put the prune stage before share")

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"recipe: expected a mapping with keys {', '.join(cls.KEYS)}, got {shown(data)}")
        for key in data:
            if key not in cls.KEYS:
                raise RecipeError(f"recipe {key}: unknown key {shown(key)}; valid keys: {', '.join(cls.KEYS)}")
        stages = data.get("stages")
        if not isinstance(stages, list):
            raise RecipeError(f"recipe stages: expected a list of stages, got {shown(stages)}")
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
            data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader, stricter)
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe: not valid YAML: {str(err)[:500]}") from None
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
                return cls.from_yaml(_read_recipe_file(path))
            bundled = bundled_recipes()
            if str(source) in bundled:
                return cls.from_yaml(bundled[str(source)].read_text(encoding="utf-8"))
            raise RecipeError(
                f"recipe {shown(str(source))} is neither a YAML file nor a bundled recipe; bundled: {', '.join(bundled)}"
            )
        raise RecipeError(f"recipe: expected a Recipe, a dict or a YAML path, got {type(source).__name__}")


# A recipe is a few hundred bytes; a file far larger is not one (and is not read whole to find out).
RECIPE_FILE_LIMIT = 1 << 20


def _read_recipe_file(path: Path) -> str:
    if path.stat().st_size > RECIPE_FILE_LIMIT:
        raise RecipeError(f"recipe {path}: {path.stat().st_size:,} bytes is not a recipe (at most "
                          f"{RECIPE_FILE_LIMIT:,}); check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe {path}: not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None


def bundled_recipes() -> dict[str, Any]:
    """Recipes shipped with the package (the repository's ``recipes/`` folder), by name."""
    folder = importlib.resources.files("hfcompress.recipes")
    return {p.name.removesuffix(".yaml"): p for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".yaml")}
