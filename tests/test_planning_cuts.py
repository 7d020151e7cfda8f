"""Plans that cut heads and FFN channels as well as choosing formats (hfcompress.planning.joint)."""

from __future__ import annotations

import pytest
import torch
from conftest import plan_command, tiny_llama

import hfcompress
from hfcompress.cli import main
from hfcompress.planning import PlanError, Sensitivity, measure_sensitivity, plan_for_bytes, plan_for_cost, uniform_plan
from hfcompress.planning.check import PlanCheck
from hfcompress.planning.joint import JointMenu
from hfcompress.quantization.stage import select_targets
from hfcompress.recipe import QuantizeStage, Recipe

WINDOWS = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
STAGE = QuantizeStage(method="gptq", bits=4, group_size=32, act_order=True, static_groups=True)
OPTIONS = [(2, 32), (4, 32), (8, 32)]


@pytest.fixture(scope="module")
def measured():
    model = tiny_llama()
    targets = select_targets(model, STAGE)
    return model, targets, measure_sensitivity(model, targets, WINDOWS, STAGE, OPTIONS, prune=("heads", "ffn"))


def _loss(model, windows=WINDOWS):
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))


def test_cuts_are_priced_per_layer_and_amount(measured):
    model, targets, s = measured
    heads, ffn = s.prune.costs["heads"], s.prune.costs["ffn"]
    assert heads.blocks == ffn.blocks == [0, 1]
    assert heads.amounts == [0, 3]  # one of the two key/value groups, with its 3 query heads
    assert ffn.amounts == [0, 0.25, 0.5]
    assert (heads.cost[:, 0] == 0).all() and (ffn.cost[:, 0] == 0).all()
    assert (heads.cost[:, 1:] > 0).all() and (ffn.cost[:, 1:] > 0).all()
    assert torch.allclose(ffn.kept[0], torch.tensor([1.0, 0.75, 0.5], dtype=torch.float64))
    assert [m[0] for m in ffn.members[1]] == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_the_priced_cut_follows_the_loss_of_zeroing_its_columns():
    """A layer whose FFN writes ten times louder into the residual stream: its cut is priced
    higher, and zeroing the planned columns there costs more measured loss too."""
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.data *= 10
    targets = select_targets(model, STAGE)
    s = measure_sensitivity(model, targets, WINDOWS, STAGE, OPTIONS, prune=("ffn",))
    ffn = s.prune.costs["ffn"]
    assert ffn.cost[1, 2] > 10 * ffn.cost[0, 2]
    base, increase = _loss(model), []
    for block in (0, 1):
        down = model.model.layers[block].mlp.down_proj
        saved = down.weight.detach().clone()
        down.weight.data[:, s.prune.removed("ffn", block, 0.5)] = 0
        increase.append(_loss(model) - base)
        down.weight.data.copy_(saved)
    assert increase[1] > increase[0] and increase[1] > 0


def test_the_recipe_cuts_the_columns_the_plan_priced(measured, tmp_path):
    """The planned prune stage (with the sensitivity's scores) gives the same function as the
    original model with the plan's zeroed columns: the units priced are the units cut."""
    model, targets, s = measured
    menu = JointMenu(s)
    smallest = float(uniform_plan(s, 2, 32).nbytes)
    plan = plan_for_bytes(menu, 0.8 * smallest)  # below every uncut plan: it must cut
    assert plan.nbytes <= 0.8 * smallest and plan.cuts()
    scores = tmp_path / "scores.safetensors"
    s.prune.scores.save(scores)
    stage = plan.prune_stage(str(scores))
    pruned = tiny_llama()
    hfcompress.compress(pruned, {"stages": [{"prune": stage}]}, calibration_data=WINDOWS)
    zeroed = tiny_llama()
    for name, columns in plan.zeroed().items():
        zeroed.get_submodule(name).weight.data[:, columns] = 0
    with torch.no_grad():
        assert torch.allclose(pruned(WINDOWS).logits, zeroed(WINDOWS).logits, atol=1e-5)


def test_a_cut_plan_compresses_to_exactly_the_planned_bytes(measured):
    model, targets, s = measured
    plan = plan_for_bytes(JointMenu(s), 0.8 * float(uniform_plan(s, 2, 32).nbytes))
    base = {"method": "gptq", "sym": True, "act_order": True, "static_groups": True}
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        scores = Path(folder) / "scores.safetensors"
        s.prune.scores.save(scores)
        recipe = {"stages": [{"prune": plan.prune_stage(str(scores))}, {"quantize": plan.quantize_stage(base)}]}
        compressed = tiny_llama()
        hfcompress.compress(compressed, recipe, calibration_data=WINDOWS)
    stored = 0
    for name in s.modules:
        stored += sum(t.numel() * t.element_size() for t in compressed.get_submodule(name).state_dict().values())
    assert stored == plan.nbytes


def test_joint_plans_never_lose_to_formats_alone(measured):
    """Cuts only add options: at any budget the joint plan is predicted at most as costly."""
    model, targets, s = measured
    menu = JointMenu(s)
    for share in (1.0, 1.3, 2.0):
        budget = share * float(uniform_plan(s, 2, 32).nbytes)
        assert plan_for_bytes(menu, budget).cost <= plan_for_bytes(s, budget).cost * (1 + 1e-9)
    target = uniform_plan(s, 4, 32).cost
    assert plan_for_cost(menu, target).nbytes <= plan_for_cost(s, target).nbytes


def test_the_check_measures_a_cut_as_its_zeroed_columns_and_puts_everything_back():
    """8-bit everywhere and half of layer 1's FFN cut: the check measures the model with those
    columns zeroed (8 bits change it little), and leaves the model as it was."""
    import math

    model = tiny_llama()
    model.model.layers[1].mlp.down_proj.weight.data *= 10  # a cut there shows in the loss
    targets = select_targets(model, STAGE)
    s = measure_sensitivity(model, targets, WINDOWS, STAGE, OPTIONS, prune=("ffn",))
    menu = JointMenu(s)
    cuts = torch.tensor([2 if g.kind == "ffn" and g.block == 1 else 0 for g in menu.groups])
    plan = menu.plan(cuts, torch.full((len(s.modules),), s.options.index((8, 32))))
    assert plan.cuts() == {"ffn": {1: 0.5}}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = PlanCheck(model, targets, STAGE, WINDOWS[:2], WINDOWS[2:])
    measured = math.log(check.ratio(plan))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    base = _loss(model, WINDOWS[2:])
    model.model.layers[1].mlp.down_proj.weight.data[:, plan.zeroed()["model.layers.1.mlp.down_proj"]] = 0
    expected = _loss(model, WINDOWS[2:]) - base
    assert expected > 0.01 and measured == pytest.approx(expected, rel=0.1)


def test_sensitivity_with_cuts_round_trips(measured, tmp_path):
    _, _, s = measured
    path = tmp_path / "s.safetensors"
    s.save(path)
    again = Sensitivity.load(path)
    for kind, costs in s.prune.costs.items():
        other = again.prune.costs[kind]
        assert other.amounts == costs.amounts and other.members == costs.members
        assert torch.equal(other.cost, costs.cost) and torch.equal(other.kept, costs.kept)
    assert all(torch.equal(a, b) for a, b in zip(again.prune.scores.ffn, s.prune.scores.ffn))
    assert plan_for_bytes(JointMenu(again), 50_000).formats() == plan_for_bytes(JointMenu(s), 50_000).formats()
    with pytest.raises(PlanError, match="--prune heads,ffn"):
        JointMenu(Sensitivity(s.modules, s.options, s.cost, s.output_error, s.nbytes, s.weights, s.float_nbytes,
                              s.loss, s.settings))


def test_plan_command_with_cuts_writes_a_recipe_compress_runs(tmp_path, tiny_llama_dir, capsys):
    argv, plan, windows = plan_command(tmp_path, tiny_llama_dir, WINDOWS)
    argv += ["--prune", "heads,ffn"]
    assert main(argv[:-2] + ["--target-size", "40%"]) == 0  # formats only
    cache = tmp_path / "plan.sensitivity.safetensors"
    first = Sensitivity.load(cache)
    assert first.prune is None
    assert main(argv + ["--target-size", "40%"]) == 0  # the cuts' costs added to the cached sensitivity
    again = Sensitivity.load(cache)
    assert set(again.prune.costs) == {"heads", "ffn"}
    assert torch.equal(again.cost, first.cost)  # the formats' costs kept, not measured again
    capsys.readouterr()
    from transformers import AutoModelForCausalLM

    from hfcompress.planning.commands import _fixed_bytes

    s = Sensitivity.load(tmp_path / "plan.sensitivity.safetensors")
    fixed = _fixed_bytes(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), set(s.modules), torch.bfloat16)
    smallest = int(s.nbytes.min(1).values.sum())  # every layer at its smallest format, nothing cut
    assert main(argv + ["--target-size", f"{fixed + int(0.8 * smallest)}B"]) == 0
    out = capsys.readouterr().out
    assert "cut in" in out
    recipe = Recipe.load(plan)
    assert [stage.name for stage in recipe.stages] == ["prune", "quantize"]
    assert recipe.stages[0].overrides and (tmp_path / "plan.prune-scores.safetensors").exists()
    assert main(["compress", str(tiny_llama_dir), "--recipe", str(plan), "--output", str(tmp_path / "out"),
                 "--calibration-data", str(windows), "--no-eval"]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as saved:
        stored = sum(saved.get_tensor(k).nbytes for k in saved.keys())
    assert stored <= fixed + 0.8 * smallest
    assert torch.isfinite(reloaded(WINDOWS[:1]).logits).all()
    assert main(argv + ["--target-size", "25%", "--prune", "layers"]) == 2
    assert "not a cut the planner prices" in capsys.readouterr().err
