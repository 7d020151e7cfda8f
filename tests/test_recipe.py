"""Recipes: every bad input names its key and the valid choices; YAML round trips are lossless."""

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hfcompress.recipe import CalibrationConfig, PruneStage, QuantizeStage, Recipe, RecipeError, bundled_recipes


def quantize(**options):
    return {"stages": [{"quantize": options}]}


@pytest.mark.parametrize("data, expected", [
    (quantize(bits=5), r"stages\[0\]\.quantize\.bits: 5 is not a valid bit width; valid: 2, 3, 4, 8"),
    (quantize(bits=1), r"bits: 1 is not a valid bit width; valid: 2, 3, 4, 8"),
    (quantize(group_size=0), r"quantize\.group_size: 0 is not valid; use -1 \(one group per row\) or a positive"),
    (quantize(group_size=-2), r"group_size: -2 is not valid"),
    (quantize(groupsize=128), r"quantize\.groupsize: unknown key 'groupsize'; valid keys: method, bits, group_size, sym"),
    (quantize(method="hqq"), r"method: 'hqq' is not a method we have; valid: rtn, gptq, awq"),
    (quantize(method="rtn", act_order=True), r"quantize\.act_order: applies to method gptq only, not 'rtn'"),
    (quantize(method="gptq", damp=1.5), r"quantize\.damp: 1\.5 must lie in \(0, 1\)"),
    (quantize(method="gptq", block_size=0), r"quantize\.block_size: 0 must be positive"),
    (quantize(bits="4"), r"quantize\.bits: expected an integer, got '4'"),
    (quantize(bits=4.0), r"quantize\.bits: expected an integer, got 4\.0"),
    (quantize(bits=True), r"quantize\.bits: expected an integer, got True"),
    (quantize(sym="yes"), r"quantize\.sym: expected true or false, got 'yes'"),
    (quantize(ignore="lm_head"), r"quantize\.ignore: expected a list, got 'lm_head'"),
    (quantize(ignore=[3]), r"quantize\.ignore\[0\]: expected a string, got 3"),
    ({"stages": [{"distil": {"steps": 1}}]}, r"stages\[0\]: unknown stage 'distil'; valid stages: rotate, prune, distill, share, quantize"),
    ({"stages": [{"prune": {"heads": 1.0}}]}, r"stages\[0\]\.prune\.heads: a fraction of 1.0 \(all of them\)"),
    ({"stages": [{"quantize": {}, "prune": {}}]}, r"stages\[0\]: a stage is a mapping with one key"),
    ({"stages": []}, r"a recipe needs at least one stage; valid stages: rotate, prune, distill, share, quantize"),
    ({"stages": {"quantize": {}}}, r"stages: expected a list of stages"),
    ({"stage": []}, r"recipe stage: unknown key 'stage'; valid keys: calibration, stages"),
    ({"calibration": {"samples": 0}, **quantize()}, r"calibration\.samples: 0 must be positive"),
    ({"calibration": {"sample": 8}, **quantize()}, r"calibration\.sample: unknown key 'sample'; valid keys: data"),
    ([1, 2], r"recipe: expected a mapping"),
])
def test_bad_recipes_name_the_problem(data, expected):
    with pytest.raises(RecipeError, match=expected):
        Recipe.from_dict(data)


def test_bad_yaml_is_a_recipe_error():
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("stages: [quantize: {bits: 4")


def test_yaml_never_builds_python_objects():
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("stages: !!python/object/apply:os.system ['true']")


def test_python_objects_validate_too():
    with pytest.raises(RecipeError, match="bits: 7"):
        QuantizeStage(bits=7)
    with pytest.raises(RecipeError, match="is not a stage"):
        Recipe(stages=[{"quantize": {}}])


def test_defaults_fill_in_and_string_stage_names_work():
    recipe = Recipe.from_yaml("stages: [quantize]")
    assert recipe.stages == [QuantizeStage()]


@st.composite
def recipes(draw):
    stages = [
        QuantizeStage(
            method="gptq",
            act_order=draw(st.booleans()),
            damp=draw(st.floats(0.001, 0.5)),
            bits=draw(st.sampled_from([2, 3, 4, 8])),
            group_size=draw(st.one_of(st.just(-1), st.integers(1, 4096))),
            sym=draw(st.booleans()),
            lm_head=draw(st.booleans()),
            ignore=draw(st.lists(st.text(min_size=1, max_size=12), max_size=3)),
        )
        for _ in range(1)  # quantize comes once, last
    ]
    amount = st.one_of(st.integers(0, 64), st.floats(0, 0.999))
    if draw(st.booleans()):
        stages.insert(0, PruneStage(
            heads=draw(amount), ffn=draw(amount), hidden=draw(amount), layers=draw(st.integers(0, 8)),
            importance=draw(st.sampled_from(PruneStage.IMPORTANCE)), gqa=draw(st.sampled_from(PruneStage.GQA)),
            uniform=draw(st.booleans()), scores=draw(st.one_of(st.none(), st.text(max_size=12)))))
    calibration = draw(st.one_of(st.none(), st.builds(
        CalibrationConfig, data=st.one_of(st.none(), st.text(max_size=20)), samples=st.integers(1, 512),
        seq_len=st.integers(1, 8192), seed=st.integers(0, 2**31 - 1))))
    return Recipe(stages=stages, calibration=calibration)


@settings(max_examples=50, deadline=None)
@given(recipes())
def test_round_trips_are_lossless(recipe):
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()


def test_load_accepts_objects_dicts_paths_and_bundled_names(tmp_path):
    recipe = Recipe(stages=[QuantizeStage(bits=8, group_size=-1)])
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.load(recipe) is recipe
    assert Recipe.load(recipe.to_dict()) == recipe
    assert Recipe.load(path) == recipe
    assert Recipe.load(str(path)) == recipe
    assert Recipe.load("w4-rtn").stages[0].bits == 4
    with pytest.raises(RecipeError, match="neither a YAML file nor a bundled recipe; bundled: .*w4-rtn"):
        Recipe.load("no-such-recipe")


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_bundled_recipe_validates(name):
    assert Recipe.load(name).stages


BILLION_LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
                         for p, c in zip(["", *"abcdefgh"], "abcdefghi"))


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, r"recipe line 2: YAML aliases \(\*a\) are not allowed"),
    ("calibration: &c {samples: 4}\nstages:\n  - quantize: {bits: 4}\nother: *c\n", "YAML aliases"),
    ("stages:\n  - quantize: {bits: 4, bits: 2}\n", r"recipe line 2: key 'bits' appears twice"),
    ("calibration: {samples: 4}\ncalibration: {samples: 8}\nstages: []\n", "key 'calibration' appears twice"),
    ("stages:\n  - distill: {temperature: .nan}\n", "temperature: expected a finite number, got nan"),
    ("stages:\n  - distill: {temperature: .inf}\n", "expected a finite number, got inf"),
    ("stages:\n  - distill: {loss: {kl: .nan}}\n", "kl: expected a finite number"),
    ("stages:\n  - quantize: {group_size: 1000000000000000000000000000000}\n", "group_size: .* is out of range"),
    ("calibration: {samples: 99999999999}\nstages: []\n", "samples: .* is out of range"),
])
def test_hostile_yaml_is_refused_at_once_with_a_short_message(text, message):
    with pytest.raises(RecipeError, match=message) as caught:
        Recipe.from_yaml(text)
    assert len(str(caught.value)) < 300


def test_error_messages_quote_a_bounded_part_of_the_value():
    with pytest.raises(RecipeError) as caught:
        Recipe.from_dict({"stages": [{"x" * 100_000: {}}]})
    assert len(str(caught.value)) < 300
    with pytest.raises(RecipeError) as caught:
        Recipe.from_dict({"stages": [{"quantize": {"ignore": [[list(range(10_000))] * 1000]}}]})
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("stages", [
    [{"quantize": {"bits": 4}}, {"quantize": {"bits": 8}}],
    [{"quantize": {"bits": 4}}, {"distill": {"steps": 1}}, {"prune": {"ffn": 0.5}}],
    [{"quantize": {"bits": 4}}, {"prune": {"ffn": 0.5}}],
])
def test_stages_after_quantize_are_refused_before_anything_runs(stages):
    with pytest.raises(RecipeError, match=r"stages\[\d\]: .* after quantize; quantize comes once, followed only by distill"):
        Recipe.from_dict({"stages": stages})


def test_pruning_more_layers_than_the_model_has_is_refused_before_calibrating():
    import hfcompress
    from hfcompress.errors import UserError

    from conftest import tiny_llama

    model = tiny_llama()
    with pytest.raises(UserError, match=r"prune.layers: 99 of the model's 2 decoder layers; keep at least one"):
        hfcompress.compress(model, {"stages": [{"prune": {"layers": 99}}]}, calibration_data=None)


def test_a_recipe_file_that_is_not_utf8_or_far_too_big_is_refused(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("stages:\n  - quantize: {bits: 4}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"not UTF-8 text \(byte 38\); save it as UTF-8 YAML"):
        Recipe.load(latin)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (2 << 20))
    with pytest.raises(RecipeError, match="is not a recipe"):
        Recipe.load(huge)


@pytest.mark.parametrize("stages, error", [
    ([{"prune": {"heads": 9}}], r"stages\[0\]\.prune\.heads: cannot remove 9 of 6"),
    ([{"prune": {"heads": 0.99}}], r"stages\[0\]\.prune\.heads: removing 6 of 6 leaves none"),
    ([{"prune": {"ffn": 160}}], r"stages\[0\]\.prune\.FFN channels: removing 160 of 160 leaves none"),
    ([{"prune": {"layers": 1}}, {"share": {"layers": [[0, 1]]}}],
     r"stages\[1\]\.share: share layers: layer 1 does not exist; the model has 1 decoder layers"),
    ([{"prune": {"ffn": 0.25}}, {"share": {"layers": [[0, 5]]}}], r"stages\[1\]\.share: .*layer 5 does not exist"),
])
def test_recipe_amounts_the_model_cannot_give_fail_before_any_stage_runs(stages, error):
    import hfcompress
    from hfcompress.errors import UserError

    from conftest import tiny_llama

    # No calibration data and no tokenizer: a stage that started calibrating would fail otherwise.
    with pytest.raises(UserError, match=error):
        hfcompress.compress(tiny_llama(), {"stages": stages}, calibration_data=None)


def test_an_ignore_pattern_that_matches_nothing_is_said_before_quantizing(caplog):
    import hfcompress

    from conftest import tiny_llama

    with caplog.at_level("WARNING"):
        hfcompress.compress(tiny_llama(), {"stages": [{"quantize": {"ignore": ["mlp.down_prj", "lm_head"]}}]})
    assert "stages[0].quantize.ignore: 'mlp.down_prj' matches no module of LlamaForCausalLM" in caplog.text


def test_prune_after_layer_sharing_is_refused_when_the_recipe_is_read():
    with pytest.raises(RecipeError, match=r"stages\[1\]: prune after share; .*put the prune stage before share"):
        Recipe.from_dict({"stages": [{"share": {"every": 2}}, {"prune": {"ffn": 0.25}}]})
    Recipe.from_dict({"stages": [{"share": {"tie_embeddings": "input"}}, {"prune": {"ffn": 0.25}}]})  # no layers shared


def test_calibration_dtype_is_read_under_its_old_name_with_a_warning():
    with pytest.warns(FutureWarning, match="'dtype' is now called 'compute_dtype'"):
        recipe = Recipe.load({"calibration": {"dtype": "float32"}, "stages": ["quantize"]})
    assert recipe.calibration.compute_dtype == "float32" and "dtype" not in recipe.calibration.to_dict()
    with pytest.raises(RecipeError, match="give only 'compute_dtype'"):
        Recipe.load({"calibration": {"dtype": "float32", "compute_dtype": "auto"}, "stages": ["quantize"]})
