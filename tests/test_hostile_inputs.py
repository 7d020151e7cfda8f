"""Property-based: recipes and checkpoint configs, valid and corrupted (every field mutated to a
wrong type, out of range, non-finite, huge, missing or unknown), give success or exactly one
clear error of ours; never another exception, never more than a bounded memory growth, never a
file read outside the model folder, never an output left behind (issue 17).
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import resource
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import READS, tiny_llama
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.errors import UserError
from hfcompress.io import save_compressed
from hfcompress.recipe import Recipe, RecipeError
from hfcompress.report import summarize_folder

WINDOWS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
MEMORY_LIMIT_MB = 1024  # growth of the peak resident size over a whole property run

RTN = {"method": "rtn", "bits": 4, "group_size": 32}
RECIPES = [
    {"stages": [{"quantize": dict(RTN)}]},
    {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "damp": 0.01}}]},
    {"stages": [{"prune": {"heads": 0.34, "ffn": 0.25, "importance": "magnitude"}}, {"quantize": dict(RTN)}]},
    {"stages": [{"prune": {"layers": 1}}]},
    {"stages": [{"share": {"every": 2, "parts": ["mlp"], "lora_rank": 2}}, {"quantize": dict(RTN)}]},
    {"stages": [{"distill": {"steps": 1, "seq_len": 16, "batch_size": 1, "temperature": 2.0,
                             "loss": {"kl": 1.0, "ce": 0.5}}}]},
    {"calibration": {"samples": 2, "seq_len": 16, "seed": 0}, "stages": [{"quantize": dict(RTN, bits=8)}]},
]
# Keys whose value is a cost the user asks for (training steps) or a path the user points at
# (data, teacher, scores): left as they are when the recipe is run, mutated when it is only parsed.
USER_CHOSEN = {"steps", "gradient_accumulation", "data", "teacher", "scores"}

hostile = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 0.5]),
    st.text(max_size=12), st.sampled_from(["/etc/passwd", "../../x", "model.layers.0.mlp", "float16", "gptq", "mean"]),
    st.lists(st.integers(-2, 5), max_size=4), st.lists(st.lists(st.integers(-1, 4), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _paths(tree, prefix=()):
    """Every place in a JSON-like tree: (path, value)."""
    yield prefix, tree
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _paths(value, (*prefix, i))


def near(value):
    """Values of the same kind as ``value``, in and around its valid range: most recipes built
    from them parse, so that the run test runs them."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(0, 8), st.integers(-1, 70))
    if isinstance(value, float):
        return st.one_of(st.floats(0, 1), st.floats(-1, 10), st.sampled_from([0.0, 1.0, math.nan]))
    if isinstance(value, str):
        return st.one_of(st.just(value), st.sampled_from(["rtn", "gptq", "mean", "magnitude", "forward", "mlp"]))
    return hostile


@st.composite
def mutated(draw, base, skip=frozenset(), plausible=False):
    """``base`` with one to three of its places deleted, replaced by a hostile value (or, with
    ``plausible``, mostly a value of the same kind), or given an unknown key."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 2) if plausible else st.integers(1, 3))):
        places = [p for p, _ in _paths(tree) if p and not (set(map(str, p)) & skip)]
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        how = draw(st.sampled_from(["replace"] * (6 if plausible else 2) + ["delete", "unknown key"]))
        if how == "delete":
            del parent[path[-1]]
        elif how == "unknown key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(hostile)
        else:
            plain = plausible and draw(st.integers(0, 9)) < 8
            parent[path[-1]] = draw(near(parent[path[-1]]) if plain else hostile)
    return tree


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def baseline_memory():
    return _peak_mb()


@settings(max_examples=300, deadline=None)
@given(data=st.sampled_from(RECIPES).flatmap(mutated))
def test_any_recipe_parses_or_is_one_short_recipe_error(data):
    try:
        Recipe.from_dict(data)
    except RecipeError as err:
        assert len(str(err)) < 600


OUTCOMES: collections.Counter = collections.Counter()  # what the run-or-fail property drew, by outcome


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.sampled_from(RECIPES).flatmap(lambda base: mutated(base, USER_CHOSEN, plausible=True)))
def test_any_recipe_runs_or_fails_clearly_and_writes_nothing_half(tmp_path_factory, baseline_memory, data):
    work = tmp_path_factory.mktemp("run")
    out = work / "out"
    try:
        recipe = Recipe.from_dict(data)
    except RecipeError:
        OUTCOMES["refused when parsed"] += 1
        event("refused when parsed")
        return
    model = tiny_llama(num_hidden_layers=4)
    try:
        hfcompress.compress(model, recipe, calibration_data=WINDOWS)
        save_compressed(model, out)
    except UserError as err:
        OUTCOMES["refused against the model"] += 1
        event("refused against the model")
        assert len(str(err)) < 1000
        assert os.listdir(work) == []  # nothing half-written, no staging folder, no lock
    else:
        event("ran and saved")
        assert os.listdir(work) == ["out"]
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        assert torch.isfinite(reloaded(WINDOWS[:1]).logits).all()
        OUTCOMES["ran and saved"] += 1
    finally:
        shutil.rmtree(work)
    assert _peak_mb() - baseline_memory < MEMORY_LIMIT_MB


def test_the_recipes_drawn_above_reached_every_outcome(tmp_path_factory, baseline_memory):
    # The property above passes for any mix of outcomes; this says the mix checked something:
    # recipes ran, saved and reloaded, and others were refused. Run on its own, it draws them first.
    if not OUTCOMES:
        test_any_recipe_runs_or_fails_clearly_and_writes_nothing_half(tmp_path_factory, baseline_memory)
    assert OUTCOMES["ran and saved"] >= 10, OUTCOMES
    assert OUTCOMES["refused when parsed"] + OUTCOMES["refused against the model"] >= 10, OUTCOMES


# --- checkpoint configs ---------------------------------------------------------------------

# What a load may read besides the folder: Python, the installed packages, the system's own files,
# and modules imported lazily (from any folder on sys.path: an editable install's source).
SYSTEM = (sys.prefix, sys.base_prefix, sys.exec_prefix, "/proc", "/sys", "/dev", "/usr", "/etc/ld.so", "/etc/localtime")


def _outside(paths: list[str], folder: Path) -> list[str]:
    folder = str(folder.resolve())
    code = tuple(os.path.realpath(p) for p in sys.path if p)
    resolved = {os.path.realpath(p) for p in paths}
    return sorted(p for p in resolved if not p.startswith((folder, *SYSTEM))
                  and not (p.startswith(code) and p.endswith((".py", ".pyc", ".so")) or p in code))


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Checkpoints whose records hold every field: packed layers, per-layer pruned sizes, shared
    modules with LoRA deltas, metrics, base model, license."""
    root = tmp_path_factory.mktemp("checkpoints")
    models = {}
    pruned = tiny_llama(num_hidden_layers=3, num_key_value_heads=6)
    hfcompress.compress(pruned, {"stages": [{"prune": {"heads": 3, "ffn": 0.5, "uniform": False}},
                                            {"quantize": dict(RTN)}]}, calibration_data=WINDOWS)
    shared = tiny_llama(num_hidden_layers=4)
    hfcompress.compress(shared, {"stages": [{"share": {"every": 2, "parts": ["mlp"], "lora_rank": 2}},
                                            {"quantize": dict(RTN)}]})
    for name, model in {"pruned": pruned, "shared": shared}.items():
        record = model.config.quantization_config
        record.metrics["perplexity"] = {"perplexity": 12.5, "windows": 3, "seq_len": 16}
        record.base_model, record.license = "org/tiny", "apache-2.0"
        model.save_pretrained(root / name, save_format="native")
        models[name] = root / name
    return models


def _record(config: dict) -> dict:
    return config.get("hfcompress") or config["quantization_config"]


@st.composite
def corrupted_checkpoint(draw, saved_models):
    name = draw(st.sampled_from(sorted(saved_models)))
    config = json.loads((saved_models[name] / "config.json").read_text())
    # quant_method says whose record this is (another value makes it another library's config)
    record = draw(mutated(_record(config), skip=frozenset({"quant_method"})))
    assume(record != _record(config))
    return name, record


def _write(saved_models, tmp_path_factory, name, record) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / name
    shutil.copytree(saved_models[name], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = record
    (folder / "config.json").write_text(json.dumps(config))
    return folder


OUTCOMES: collections.Counter = collections.Counter()  # what the run-or-fail property drew, by outcome


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_checkpoint_config_loads_or_is_one_clear_error(saved_models, tmp_path_factory, baseline_memory, data):
    name, record = data.draw(corrupted_checkpoint(saved_models))
    folder = _write(saved_models, tmp_path_factory, name, record)
    before = sorted(os.listdir(folder.parent))
    listing = sorted(os.listdir(folder))
    for read in (lambda: AutoModelForCausalLM.from_pretrained(folder), lambda: summarize_folder(folder)):
        READS.paths.clear()
        READS.watching = True
        try:
            result = read()
        except UserError as err:
            assert len(str(err)) < 1000
        else:
            if isinstance(result, torch.nn.Module):
                result(WINDOWS[:1])  # what loaded runs
        finally:
            READS.watching = False
        assert _outside(READS.paths, folder) == [], "read a file outside the model folder"
    assert sorted(os.listdir(folder)) == listing and sorted(os.listdir(folder.parent)) == before
    shutil.rmtree(folder.parent)
    assert _peak_mb() - baseline_memory < MEMORY_LIMIT_MB
