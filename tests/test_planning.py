"""Compress to a budget: per-layer format overrides, sensitivity, the planner, ``hfcompress plan``."""

import itertools
import json
import math

import pytest
import torch
import yaml

import hfcompress
from hfcompress.cli import main
from hfcompress.planning import (PlanError, Sensitivity, SensitivityError, measure_sensitivity, plan_for_bytes,
                                 plan_for_cost, uniform_plan)
from hfcompress.planning.commands import parse_fraction, parse_size
from hfcompress.planning.sensitivity import stored_nbytes
from hfcompress.quantization.qlinear import LinearFormat, QuantLinear
from hfcompress.quantization.stage import select_targets
from hfcompress.recipe import QuantizeStage, Recipe, RecipeError

from conftest import plan_command, tiny_llama

WINDOWS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))


def synthetic(m=6, seed=0, options=((2, 64), (3, 64), (4, 64), (8, 64))):
    """Costs falling and sizes rising with bits, each layer with its own sensitivity."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(m, generator=g) * 10 + 0.1
    bits = torch.tensor([b for b, _ in options], dtype=torch.float64)
    cost = scale[:, None].double() * torch.pow(4.0, -bits)[None] * (1 + 0.2 * torch.rand(m, len(options), generator=g))
    weights = torch.randint(1, 5, (m,), generator=g) * 1000
    nbytes = (weights[:, None] * (bits[None] + 0.25) / 8).round().long()
    return Sensitivity([f"l{i}" for i in range(m)], list(options), cost.float(), torch.zeros(m, len(options)),
                       nbytes, weights, weights * 4, 3.0)


def brute_force(s, fits, value):
    best = None
    for combo in itertools.product(range(len(s.options)), repeat=len(s.modules)):
        choice = torch.tensor(combo)
        nbytes = int(s.nbytes.gather(1, choice[:, None]).sum())
        cost = float(s.cost.gather(1, choice[:, None]).sum())
        if fits(nbytes, cost) and (best is None or value(nbytes, cost) < best):
            best = value(nbytes, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_for_bytes_fits_and_is_near_the_exact_optimum(seed):
    s = synthetic(seed=seed)
    smallest, largest = int(s.nbytes.min(1).values.sum()), int(s.nbytes.max(1).values.sum())
    for budget in torch.linspace(smallest, largest, 7).tolist():
        plan = plan_for_bytes(s, budget)
        assert plan.nbytes <= budget
        optimum = brute_force(s, lambda b, c: b <= budget, lambda b, c: c)
        # Lagrangian + greedy: at most the exact optimum plus one layer's step (measured: equal here mostly).
        step = float((s.cost.max(1).values - s.cost.min(1).values).max())
        assert plan.cost <= optimum + step + 1e-6
        for bits, group in s.options:  # never worse than a uniform plan that fits
            uniform = uniform_plan(s, bits, group)
            if uniform.nbytes <= budget:
                assert plan.cost <= uniform.cost + 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_plan_for_cost_is_the_smallest_within_the_loss(seed):
    s = synthetic(seed=seed)
    low, high = float(s.cost.min(1).values.sum()), float(s.cost.max(1).values.sum())
    for limit in [low * 1.01, (low + high) / 8, (low + high) / 2, high]:
        plan = plan_for_cost(s, limit)
        assert plan.cost <= limit * (1 + 1e-6)  # the costs are float32
        for bits, group in s.options:
            uniform = uniform_plan(s, bits, group)
            if uniform.cost <= limit:
                assert plan.nbytes <= uniform.nbytes


def test_bits_count_as_in_uniform_recipes():
    from hfcompress.planning import bytes_for_bits

    s = synthetic()
    u3, u4 = uniform_plan(s, 3, 64).nbytes, uniform_plan(s, 4, 64).nbytes
    assert bytes_for_bits(s, 4, 64) == u4 and bytes_for_bits(s, 3.5, 64) == (u3 + u4) / 2
    plan = plan_for_bytes(s, bytes_for_bits(s, 3.5, 64))
    assert u3 < plan.nbytes <= (u3 + u4) / 2
    with pytest.raises(PlanError, match="outside the measured widths"):
        bytes_for_bits(s, 9, 64)
    with pytest.raises(PlanError, match="no option with groups of 128"):
        bytes_for_bits(s, 4, 128)


def test_impossible_targets_say_why():
    s = synthetic()
    with pytest.raises(PlanError, match="below the smallest plan"):
        plan_for_bytes(s, 10)
    with pytest.raises(PlanError, match="no measured option meets the target"):
        plan_for_cost(s, 0.0)
    with pytest.raises(SensitivityError, match="no option of 5 bits"):
        uniform_plan(s, 5, 64)


@pytest.mark.parametrize("factor", [0.5, 1.7, 3.0])
def test_plan_within_meets_the_measured_target_with_the_smallest_plan(factor):
    """Measured losses off from the predicted ones by a constant factor: the search lands on the
    plan the planner gives for the corrected target (or a smaller one that still meets it)."""
    from hfcompress.planning.check import plan_within

    s = synthetic(m=8, seed=3)
    low, high = float(s.cost.min(1).values.sum()), float(s.cost.max(1).values.sum())
    goal = low * factor + (high - low) / 20
    calls = []

    def measure(plan):
        calls.append(plan.nbytes)
        return math.exp(factor * plan.cost)

    plan, ratio = plan_within(s, math.exp(goal), measure, steps=8)
    assert ratio == pytest.approx(math.exp(factor * plan.cost)) and ratio <= math.exp(goal)
    assert plan.nbytes <= plan_for_cost(s, goal / factor).nbytes
    assert len(calls) <= 8 and len(calls) == len(set(calls))  # no plan measured twice
    with pytest.raises(PlanError, match="most precise plan measures"):
        plan_within(s, math.exp(low * factor * 0.5), measure)


def test_plan_writes_one_override_per_minority_format():
    s = synthetic(m=4)
    plan = plan_for_bytes(s, float(uniform_plan(s, 3, 64).nbytes))
    stage = plan.quantize_stage({"method": "gptq", "act_order": True})
    parsed = QuantizeStage.from_dict(stage)
    assert {name: parsed.format_of(name) for name in s.modules} == plan.formats()


def test_targets_parse():
    assert parse_size("30%", 1000) == pytest.approx(300)
    assert parse_size("0.5", 1000) == pytest.approx(500)
    assert parse_size("2MB", 0) == 2e6 and parse_size("1GiB", 0) == 2**30
    assert parse_fraction("10%", "x") == pytest.approx(0.1) and parse_fraction("0.05", "x") == 0.05
    for bad in ("ten", "5", "3XB"):
        with pytest.raises(hfcompress.errors.UserError):
            parse_size(bad, 1000)


# -- per-layer overrides in recipes --------------------------------------------------------------


def test_overrides_parse_and_the_last_match_wins():
    stage = QuantizeStage.from_dict({"method": "gptq", "bits": 3, "group_size": 64, "overrides": [
        {"modules": ["mlp.*"], "bits": 4},
        {"modules": ["model.layers.1.mlp.down_proj"], "bits": 8, "group_size": 128}]})
    assert stage.format_of("model.layers.0.self_attn.q_proj") == (3, 64)
    assert stage.format_of("model.layers.0.mlp.up_proj") == (4, 64)
    assert stage.format_of("model.layers.1.mlp.down_proj") == (8, 128)
    assert Recipe.from_dict({"stages": [{"quantize": stage.to_dict()}]}).stages[0] == stage


@pytest.mark.parametrize("override, message", [
    ({"modules": ["mlp.*"], "bits": 5}, "bits: 5 is not a valid bit width"),
    ({"modules": [], "bits": 4}, "name at least one module"),
    ({"modules": ["mlp.*"], "bitz": 4}, "unknown key 'bitz'"),
    ({"modules": "mlp.*", "bits": 4}, "expected a list"),
])
def test_bad_overrides_are_refused_with_their_path(override, message):
    with pytest.raises(RecipeError, match=message) as info:
        Recipe.from_dict({"stages": [{"quantize": {"method": "gptq", "overrides": [override]}}]})
    assert "overrides[0]" in str(info.value)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_overrides_give_layers_their_formats_and_survive_a_reload(method, tmp_path):
    model = tiny_llama()
    overrides = [{"modules": ["model.layers.0.self_attn.k_proj"], "bits": 8},  # splits the stacked q/k/v solve
                 {"modules": ["mlp.down_proj"], "bits": 2, "group_size": 32}]
    recipe = {"stages": [{"quantize": {"method": method, "bits": 4, "group_size": 64, "overrides": overrides}}]}
    hfcompress.compress(model, recipe, calibration_data=WINDOWS)
    formats = {name: (m.format.bits, m.format.group_size) for name, m in model.named_modules()
               if isinstance(m, QuantLinear)}
    assert formats["model.layers.0.self_attn.k_proj"] == (8, 64)
    assert formats["model.layers.1.self_attn.k_proj"] == (4, 64)
    assert formats["model.layers.0.self_attn.q_proj"] == (4, 64)
    assert formats["model.layers.1.mlp.down_proj"] == (2, 32)
    ids = WINDOWS[:1]
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, before, atol=1e-4)


def test_gptq_with_overrides_equals_gptq_of_each_format_alone():
    """Splitting a stacked group by format gives each module what a uniform run of its format gives."""
    mixed, uniform8 = tiny_llama(num_hidden_layers=1), tiny_llama(num_hidden_layers=1)
    hfcompress.compress(mixed, {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 64, "overrides": [
        {"modules": ["*"], "bits": 8}]}}]}, calibration_data=WINDOWS)
    hfcompress.compress(uniform8, {"stages": [{"quantize": {"method": "gptq", "bits": 8, "group_size": 64}}]},
                        calibration_data=WINDOWS)
    for (name, a), (_, b) in zip(mixed.state_dict().items(), uniform8.state_dict().items()):
        assert torch.equal(a, b), name


# -- sensitivity ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama()
    stage = QuantizeStage(method="gptq", bits=4, group_size=64, act_order=True, static_groups=True)
    targets = select_targets(model, stage)
    options = [(2, 32), (4, 32), (8, 32)]
    return model, targets, measure_sensitivity(model, targets, WINDOWS, stage, options)


def test_sensitivity_falls_with_bits_and_sizes_are_what_is_saved(measured):
    model, targets, s = measured
    assert s.modules == list(targets) and s.cost.shape == (len(targets), 3)
    assert (s.cost >= 0).all()
    assert (s.cost[:, 0] > s.cost[:, 1]).all() and (s.cost[:, 1] > s.cost[:, 2]).all()
    assert (s.output_error[:, 0] > s.output_error[:, 2]).all()
    for i, name in enumerate(s.modules):
        module = targets[name]
        fmt = LinearFormat(bits=4, group_size=32, sym=True)
        packed = QuantLinear(module.in_features, module.out_features, fmt)
        assert s.nbytes[i, 1] == sum(t.numel() * t.element_size() for t in packed.state_dict().values())
        assert s.nbytes[i, 1] == stored_nbytes(module.in_features, module.out_features, fmt)
    assert s.loss == pytest.approx(math.log(300), rel=0.2)  # a random model: about uniform over its vocabulary


def test_sensitivity_predicts_the_loss_of_quantizing_one_layer(measured):
    """The 2-bit cost of the most and the least sensitive layers, against the measured loss increase."""
    model, targets, s = measured
    from hfcompress.planning.sensitivity import _quantized_change

    def loss_with(name):
        module = targets[name]
        saved = module.weight.detach().clone()
        H = None
        stage = QuantizeStage(method="rtn", bits=2, group_size=32)
        module.weight.data += _quantized_change(saved.float(), H, stage, 2, 32)
        try:
            with torch.no_grad():
                total = 0.0
                for w in WINDOWS:
                    logits = model(w[None]).logits[0, :-1]
                    total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            return total / (WINDOWS.shape[0] * (WINDOWS.shape[1] - 1)) - s.loss
        finally:
            module.weight.data.copy_(saved)

    order = s.cost[:, 0].argsort()
    low, high = s.modules[int(order[0])], s.modules[int(order[-1])]
    assert loss_with(high) > loss_with(low)


def test_plan_check_measures_the_plan_and_puts_the_weights_back(measured):
    from hfcompress.planning.check import PlanCheck

    model, targets, s = measured
    stage = QuantizeStage(method="gptq", bits=4, group_size=64, act_order=True, static_groups=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = PlanCheck(model, targets, stage, WINDOWS[:2], WINDOWS[2:])
    two, eight = check.ratio(uniform_plan(s, 2, 32)), check.ratio(uniform_plan(s, 8, 32))
    # A random model: 2 bits move its loss on random tokens either way, 8 bits hardly at all.
    assert abs(math.log(two)) > 5 * abs(math.log(eight)) and eight == pytest.approx(1.0, abs=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert check.ratio(uniform_plan(s, 2, 32)) == two  # the kept quantized weights give the same model


def test_sensitivity_file_round_trip_and_corruption(measured, tmp_path):
    _, _, s = measured
    path = tmp_path / "s.safetensors"
    s.save(path)
    again = Sensitivity.load(path)
    assert again.modules == s.modules and again.options == s.options and again.settings == s.settings
    assert torch.equal(again.cost, s.cost) and torch.equal(again.nbytes, s.nbytes)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SensitivityError, match="measure it again"):
        Sensitivity.load(path)


# -- the command ---------------------------------------------------------------------------------


def test_plan_command_writes_a_recipe_compress_runs(tmp_path, tiny_llama_dir, capsys):
    argv, plan, windows = plan_command(tmp_path, tiny_llama_dir, WINDOWS)
    assert main(argv + ["--target-bits", "4.2"]) == 0
    out = capsys.readouterr().out
    assert "bits per weight" in out and "uniform 4-bit g64" in out
    cache = tmp_path / "plan.sensitivity.safetensors"
    assert cache.exists()
    stamp = cache.stat().st_mtime_ns
    assert main(argv + ["--target-size", "60%"]) == 0  # the cached sensitivity is read, not measured again
    assert cache.stat().st_mtime_ns == stamp
    recipe = Recipe.load(plan)
    assert recipe.stages[0].method == "gptq"
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(plan), "--output", str(tmp_path / "out"),
                 "--calibration-data", str(windows), "--no-eval"]) == 0
    assert main(argv + ["--max-ppl-increase", "50%"]) == 0
    out = capsys.readouterr().out
    ratio = float(out.split("check: measured perplexity x")[1].split()[0])
    assert ratio <= 1.5
    assert "measured perplexity" in plan.read_text()
    assert main(argv + ["--max-ppl-increase", "50%", "--check-data", str(windows)]) == 0  # checked on other text
    assert f"windows of {windows}" in capsys.readouterr().out
    assert main(argv + ["--max-ppl-increase", "ten"]) == 2
    assert "expected a percentage" in capsys.readouterr().err
    assert main(argv + ["--target-bits", "4", "--check-windows", "3"]) == 2
    assert "the check 3 more" in capsys.readouterr().err


# -- the report ----------------------------------------------------------------------------------


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_page(page):
    """The page is well-formed HTML whose images all exist, decode and show something."""
    from html.parser import HTMLParser

    import matplotlib.image

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open, self.images = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            elif tag not in ("meta", "br"):
                self.open.append(tag)

        def handle_endtag(self, tag):
            assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
            self.open.pop()

    parser = Page()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.open == [] and parser.images
    for src in parser.images:
        png = page.parent / src
        width, height = _png_size(png)
        assert width >= 400 and height >= 200
        pixels = matplotlib.image.imread(png)
        assert pixels.std() > 0.05, f"{src} is nearly blank"
    return parser.images


def _browser_screenshot(page, tmp_path):
    """The page as headless Chromium renders it (None where no Chromium is installed)."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return None
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400", f"--screenshot={shot}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return shot


def test_frontier_keeps_the_points_nothing_beats():
    from hfcompress.planning.report import Point, frontier

    points = [Point("a", 100, 30.0), Point("b", 200, 25.0), Point("c", 250, 26.0), Point("d", 300, 22.0)]
    assert [p.name for p in frontier(points)] == ["a", "b", "d"]


def test_report_page_from_results_with_bit_maps_and_sensitivity(measured, tmp_path):
    from hfcompress.planning.report import read_results, write_report

    _, targets, s = measured
    plan = plan_for_bytes(s, float(uniform_plan(s, 4, 32).nbytes))
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"stages": [{"quantize": plan.quantize_stage(
        {"method": "gptq"})}]}))
    results = tmp_path / "results.jsonl"
    lines = [{"run": "float", "weights_bytes": 4000, "wikitext2_ppl": 20.0},
             {"run": "u4", "weights_bytes": 1500, "wikitext2_ppl": 24.0},
             {"run": "plan", "weights_bytes": 1400, "wikitext2_ppl": 23.0, "recipe": "plan.yaml"},
             {"sensitivity_seconds": 3.0},
             {"run": "w4-rtn", "weights_bytes": 1500, "wikitext2_ppl": 30.0}]
    results.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    points = read_results(results, s.modules)
    assert [p.kind for p in points] == ["float", "recipe", "recipe", "anchor"]
    assert points[2].formats == plan.formats()
    page = write_report(tmp_path / "report", points, s)
    images = _check_page(page)
    assert images == ["frontier.png", "bits-plan.png", "sensitivity.png"]
    assert not list(tmp_path.glob(".report*"))  # no staging folder left behind
    shot = _browser_screenshot(page, tmp_path)
    if shot is not None:  # a real browser drew the page with its plots in it: the points' blue is on screen
        import matplotlib.image

        pixels = matplotlib.image.imread(shot)[..., :3]
        blue = torch.tensor([31, 119, 180]) / 255
        near = (torch.from_numpy(pixels.copy()) - blue).abs().max(-1).values < 0.05
        assert int(near.sum()) > 50


def test_report_command_runs_recipes_and_puts_the_plot_in_a_model_card(tmp_path, tiny_llama_dir, capsys):
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert main(["compress", str(tiny_llama_dir), "--recipe", "w4g64-rtn", "--output", str(tmp_path / "saved"),
                 "--no-eval"]) == 0
    assert main(["report", str(tiny_llama_dir), "--recipes", "w4g64-rtn", "w8-rtn", "--data", str(text),
                 "--seq-len", "64", "--max-windows", "2", "--output", str(tmp_path / "report"),
                 "--card", str(tmp_path / "saved")]) == 0
    images = _check_page(tmp_path / "report" / "index.html")
    assert "frontier.png" in images and "bits-w4g64-rtn.png" in images
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "](frontier.png)" in card and (tmp_path / "saved" / "frontier.png").is_file()
    assert main(["report", "--results", str(tmp_path / "missing.jsonl")]) == 2
    assert "--results" in capsys.readouterr().err
