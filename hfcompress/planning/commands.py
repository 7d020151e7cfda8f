"""``hfcompress plan``: measure (or read) the layers' sensitivity, choose each layer's format
under a budget, write the recipe that ``hfcompress compress`` runs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from ..errors import UserError

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(%|[kKmMgG]i?B|B)?\s*$")
_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_fraction(text: str, what: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1."""
    match = _SIZE.match(str(text))
    if not match or match.group(2) not in (None, "%"):
        raise UserError(f"{what} {text!r}: expected a percentage such as 10% (or a fraction such as 0.1)")
    value = float(match.group(1))
    return value / 100 if match.group(2) == "%" else value


def parse_size(text: str, whole: int) -> float:
    """``"30%"`` (of ``whole`` bytes), ``"0.3"`` (a fraction), or ``"500MB"``/``"4GB"``/``"1GiB"`` -> bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"--target-size {text!r}: expected a share of the model such as 30%, or a size such as "
                        "500MB or 4GB")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        return value / 100 * whole
    if unit is None:
        if value >= 1:
            raise UserError(f"--target-size {text!r}: give a unit (500MB, 4GB) or a share (30% or 0.3)")
        return value * whole
    if unit not in _UNITS:
        raise UserError(f"--target-size {text!r}: unknown unit {unit}; use B, kB, MB, GB, KiB, MiB or GiB")
    return value * _UNITS[unit]


def _command(sub, name: str, summary: str, description: str):
    """A subcommand taking MODEL as the other commands do."""
    parser = sub.add_parser(name, help=summary, description=description)
    parser.add_argument("model", nargs="?", help="model folder, .gguf file or Hub id (default: bundled SmolLM2-135M)")
    return parser


def add_plan_parser(sub) -> None:
    plan = _command(sub, "plan", "choose each layer's bit width for a size, bits or quality target and write the "
                                 "recipe",
                    "Measure how much each linear layer's quantization options cost MODEL (cached), choose one option "
                    "per layer for the target, and write a recipe for hfcompress compress.")
    target = plan.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-size", help="the whole saved model's size: a share of the model as loaded (30%%) "
                                              "or bytes (500MB, 4GB)")
    target.add_argument("--target-bits", type=float,
                        help="bits per weight as uniform recipes count them: the size of a uniform model of that many "
                             "bits at the recipe's group size (3.5: halfway between uniform 3-bit and 4-bit)")
    target.add_argument("--max-ppl-increase", help="largest perplexity increase over the unquantized model, e.g. 10%%")
    plan.add_argument("--recipe", default="w4g64-gptq",
                      help="recipe of one quantize stage whose method and settings the plan keeps "
                           "(default: w4g64-gptq)")
    plan.add_argument("--output", default="plan.yaml", help="the planned recipe (default: plan.yaml)")
    plan.add_argument("--sensitivity", help="cached sensitivity file, read if it exists, else measured and written "
                                            "(default: OUTPUT with .sensitivity.safetensors)")
    plan.add_argument("--calibration-data", help="calibration text or token windows (default: the recipe's, else the "
                                                 "bundled text)")
    plan.add_argument("--sensitivity-windows", type=int, default=16,
                      help="calibration windows the sensitivity is measured on (default: 16)")
    plan.add_argument("--check-windows", type=int, default=8,
                      help="calibration windows after the sensitivity's on which the plan's perplexity is measured "
                           "with all its layers quantized (default: 8; 0 skips the check, except for "
                           "--max-ppl-increase, which needs it)")
    plan.add_argument("--check-data",
                      help="text (file, folder, dataset or token windows) the check measures on, ideally like what the "
                           "model will read: the quantization's damage differs from text to text, and the "
                           "--max-ppl-increase target holds on this text (default: the calibration windows after "
                           "the sensitivity's)")
    plan.add_argument("--check-steps", type=int, default=6,
                      help="--max-ppl-increase: at most this many plans measured in the search (default: 6)")
    plan.add_argument("--prune", default="",
                      help="cuts the plan may choose besides formats, per decoder layer: heads (whole key/value groups "
                           "with their query heads), ffn (25%% or 50%% of the channels), or heads,ffn; priced one-shot "
                           "(no distillation after the cut)")
    plan.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                      help="the dtype compress will save the model in (its --dtype, default bfloat16): sizes count "
                           "what stays unquantized in it (the sensitivity is measured in float32)")
    plan.add_argument("--trust-remote-code", action="store_true", help="run the model's own code from the Hub")


def _base_stage(recipe):
    stages = [stage for stage in recipe.stages if stage.name == "quantize"]
    if len(recipe.stages) != 1 or not stages:
        raise UserError(f"--recipe: a plan starts from a recipe of one quantize stage (this one has "
                        f"{', '.join(s.name for s in recipe.stages) or 'no stages'}); plan the quantize stage alone")
    stage = stages[0]
    if stage.method == "awq" or stage.awq:
        raise UserError("--recipe: the plan measures GPTQ or RTN options; AWQ's scales are not planned yet "
                        "(use a gptq or rtn recipe)")
    if stage.embeddings is not None:
        raise UserError("--recipe: the plan chooses formats of linear layers; drop quantize.embeddings from the recipe")
    return stage


def run_plan(args) -> int:
    import dataclasses

    import torch

    from ..context import CompressionContext
    from ..io import load_model
    from ..quantization.stage import select_targets
    from ..recipe import CalibrationConfig, QuantizeStage, Recipe
    from .check import PlanCheck, plan_within
    from .joint import JointMenu
    from .planner import bytes_for_bits, plan_for_bytes, uniform_plan
    from .sensitivity import Sensitivity, measure_sensitivity, sensitivity_settings, with_prune_costs

    recipe = Recipe.load(args.recipe)
    stage = _base_stage(recipe)
    if args.sensitivity_windows < 1:
        raise UserError("--sensitivity-windows: give at least 1")
    if args.max_ppl_increase is not None and args.check_windows < 1:
        raise UserError("--check-windows: --max-ppl-increase measures its plans; give at least 1")
    output = Path(args.output)
    cache = Path(args.sensitivity) if args.sensitivity else output.with_name(output.stem + ".sensitivity.safetensors")
    model, tokenizer, source = load_model(args.model, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    targets = select_targets(model, stage)
    context = CompressionContext(calibration=recipe.calibration or CalibrationConfig(),
                                 calibration_data=args.calibration_data, tokenizer=tokenizer,
                                 vocab_size=model.get_input_embeddings().num_embeddings)
    calibration = context.calibration_windows()
    windows = calibration[: args.sensitivity_windows]
    if args.check_data is not None:
        from ..calibration import calibration_windows

        config = context.calibration
        held_out = calibration_windows(context.tokenizer_for(args.check_data), args.check_data,
                                       max(args.check_windows, 0), config.seq_len, config.seed, context.vocab_size)
        checked_on = f"{len(held_out)} windows of {args.check_data}"
    else:
        held_out = calibration[args.sensitivity_windows: args.sensitivity_windows + max(args.check_windows, 0)]
        checked_on = f"{len(held_out)} held-out calibration windows"
    if len(held_out) < args.check_windows:
        raise UserError(f"{len(calibration)} calibration windows: the sensitivity takes {args.sensitivity_windows} "
                        f"and the check {args.check_windows} more; lower --sensitivity-windows or --check-windows, "
                        "or raise the recipe's calibration samples")
    kinds = _prune_kinds(args.prune)
    wanted = sensitivity_settings(stage, windows, prune=kinds)
    sensitivity = Sensitivity.load(cache) if cache.exists() else None
    if sensitivity is not None and sensitivity.modules == list(targets) and sensitivity.settings != wanted and (
            _without_cuts(sensitivity.settings) == _without_cuts(wanted)):
        logger.info("%s was measured with other cuts: measuring the cuts %s only", cache, ",".join(kinds) or "(none)")
        sensitivity = with_prune_costs(sensitivity, model, targets, windows, kinds)
        sensitivity.save(cache)
    if sensitivity is not None and (sensitivity.modules != list(targets) or sensitivity.settings != wanted):
        logger.info("%s was measured for other layers, windows or settings: measuring again", cache)
        sensitivity = None
    if sensitivity is None:
        sensitivity = measure_sensitivity(model, targets, windows, stage, prune=kinds)
        sensitivity.save(cache)
        logger.info("sensitivity written to %s", cache)
    else:
        logger.info("sensitivity read from %s", cache)

    choices = JointMenu(sensitivity) if kinds else sensitivity  # what the planner chooses from
    check = PlanCheck(model, targets, stage, windows, held_out) if args.check_windows > 0 else None
    measured = None
    planned = set(targets)
    fixed = _fixed_bytes(model, planned, getattr(torch, args.dtype))
    if args.target_size is not None:
        whole = fixed + int(sensitivity.float_nbytes.sum())
        plan = plan_for_bytes(choices, parse_size(args.target_size, whole) - fixed)
    elif args.target_bits is not None:
        groups = sorted({g for _, g in sensitivity.options})
        group_size = stage.group_size if stage.group_size in groups else groups[0]  # bits counted at that group size
        plan = plan_for_bytes(choices, bytes_for_bits(sensitivity, args.target_bits, group_size))
    else:
        increase = parse_fraction(args.max_ppl_increase, "--max-ppl-increase")
        if increase <= 0:
            raise UserError(f"--max-ppl-increase {args.max_ppl_increase}: give an increase above 0")
        plan, measured = plan_within(choices, 1 + increase, check.ratio, steps=args.check_steps)
    if measured is None and check is not None:
        measured = check.ratio(plan)
    quality = "" if measured is None else f"measured perplexity x{measured:.4f} on {checked_on}"

    defaults = QuantizeStage().to_dict()  # the planned stage names only what differs from them
    base = {k: v for k, v in stage.to_dict().items() if k == "method" or (k != "overrides" and v != defaults[k])}
    scores = output.with_name(output.stem + ".prune-scores.safetensors")
    prune = plan.prune_stage(str(scores))
    planned_recipe = {"stages": ([{"prune": prune}] if prune else []) + [{"quantize": plan.quantize_stage(base)}]}
    if recipe.calibration is not None:
        planned_recipe = {"calibration": dataclasses.asdict(recipe.calibration), **planned_recipe}
    Recipe.from_dict(planned_recipe)  # what compress will read: checked before writing
    header = (f"# Planned by hfcompress plan for {args.model or source.hub_id}: {plan.describe()}\n"
              + (f"# {quality}\n" if quality else "") + f"# Sensitivity: {cache}\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    if prune:  # the prune stage cuts the units the plan priced: the sensitivity's own scores
        sensitivity.prune.scores.save(scores)
    staging = output.with_name(output.name + ".partial")
    staging.write_text(header + yaml.safe_dump(planned_recipe, sort_keys=False, width=120), encoding="utf-8")
    staging.replace(output)

    print(f"plan: {plan.describe()}")
    if quality:
        print(f"check: {quality}")
    print(f"whole model: {(fixed + plan.nbytes) / 1e6:.2f} MB (layers kept as they are: {fixed / 1e6:.2f} MB)")
    for bits, group_size in sensitivity.options:
        uniform = uniform_plan(sensitivity, bits, group_size)
        print(f"  uniform {bits}-bit g{group_size}: {uniform.nbytes / 1e6:.2f} MB, predicted perplexity "
              f"x{uniform.perplexity_ratio:.4f}")
    print(f"recipe written to {output}; run: hfcompress compress {args.model or ''} --recipe {output}".replace("  ", " "))
    return 0


def _without_cuts(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != "prune"}


def _prune_kinds(text: str) -> tuple[str, ...]:
    """``--prune heads,ffn`` -> ("ffn", "heads"); a clear error for anything else."""
    from .pruning import PRUNE_KINDS

    kinds = tuple(sorted({k.strip() for k in text.split(",") if k.strip()}))
    unknown = [k for k in kinds if k not in PRUNE_KINDS]
    if unknown:
        raise UserError(f"--prune {text!r}: {', '.join(unknown)} is not a cut the planner prices; give heads, ffn "
                        "or heads,ffn")
    return kinds


def _fixed_bytes(model, planned: set[str], float_dtype=None) -> int:
    """Bytes of what the plan leaves as it is (embeddings, norms, layers not quantized) as saved:
    persistent tensors, each once (tied ones are stored once), floating ones in ``float_dtype``
    when given (the dtype they will be saved in)."""
    seen, total = set(), 0
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key.rpartition(".")[0] in planned or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = float_dtype.itemsize if float_dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def add_report_parser(sub) -> None:
    report = _command(sub, "report", "an HTML page of plots: size against perplexity of recipes, per-layer bits, "
                                     "sensitivity",
                      "Run RECIPES on MODEL (or read measured results) and write an HTML page with the size/quality "
                      "frontier, per-layer bit maps and the sensitivity profile.")
    source = report.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipes", nargs="+", help="recipes to run and measure (files or bundled names)")
    source.add_argument("--results", help="measured results instead: JSON lines with run, weights_bytes, "
                                          "wikitext2_ppl (and recipe), as benchmarks/plan_vs_uniform.py writes")
    report.add_argument("--output", default="report", help="folder of the page and its PNGs (default: report)")
    report.add_argument("--sensitivity", help="a sensitivity file (from hfcompress plan) for the profile plot")
    report.add_argument("--data", help="perplexity text for --recipes (default: the bundled evaluation text)")
    report.add_argument("--max-windows", type=int, help="evaluate only the first N windows (--recipes)")
    report.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window (default: 2048)")
    report.add_argument("--calibration-data", help="calibration data for the recipes that need it")
    report.add_argument("--card", help="a saved model folder: copy the frontier plot in and rewrite its model card")
    report.add_argument("--dtype", default="float32", help="dtype to load the model in (default: float32)")
    report.add_argument("--trust-remote-code", action="store_true", help="run the model's own code from the Hub")


def _measure_recipes(args) -> list:
    """Each recipe compressed in memory and its perplexity measured; the unquantized model first."""
    from .. import compress
    from ..data import bundled_text
    from ..evaluation import evaluate_perplexity
    from ..io import load_model
    from ..recipe import Recipe
    from .report import Point

    data = args.data or bundled_text("evaluation")
    recipes = [(name, Recipe.load(name)) for name in args.recipes]  # all checked before the slow part
    points = []
    for name, recipe in [("unquantized", None), *recipes]:
        model, tokenizer, _ = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        if recipe is not None:
            compress(model, recipe, tokenizer=tokenizer, calibration_data=args.calibration_data)
        result = evaluate_perplexity(model, tokenizer, data, seq_len=args.seq_len, max_windows=args.max_windows)
        config = getattr(model.config, "quantization_config", None)
        formats = {m: (f.bits, f.group_size) for m, f in (getattr(config, "modules", None) or {}).items()}
        rounded = recipe is not None and all(s.name != "quantize" or s.method == "rtn" for s in recipe.stages)
        kind = "float" if recipe is None else "anchor" if rounded else "recipe"
        points.append(Point(Path(name).stem, _fixed_bytes(model, set()), result.perplexity, kind, formats))
        logger.info("%s: %.2f MB, perplexity %.3f", name, points[-1].nbytes / 1e6, result.perplexity)
    return points


def run_report(args) -> int:
    from ..card import FRONTIER_PNG, write_folder_card
    from .report import read_results, write_report
    from .sensitivity import Sensitivity

    if args.card and not (Path(args.card) / "config.json").is_file():
        raise UserError(f"--card {args.card}: not a saved model folder (no config.json)")
    sensitivity = Sensitivity.load(args.sensitivity) if args.sensitivity else None
    if args.results:
        points = read_results(args.results, sensitivity.modules if sensitivity is not None else None)
    else:
        points = _measure_recipes(args)
    page = write_report(args.output, points, sensitivity)
    print(f"report written to {page}")
    if args.card:
        import shutil

        shutil.copyfile(Path(args.output) / FRONTIER_PNG, Path(args.card) / FRONTIER_PNG)
        write_folder_card(args.card)
        print(f"{args.card}/README.md now shows the frontier plot")
    return 0
