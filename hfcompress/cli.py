"""The ``hfcompress`` command: argparse onto the public API, nothing more.

    hfcompress compress [MODEL] --recipe R --output DIR     compress (default: bundled SmolLM2-135M)
    hfcompress eval MODEL --data D                          perplexity: JSON, or a table on a terminal
    hfcompress export DIR --format gptq|compressed-tensors --output OUT   for vLLM, TGI, SGLang
    hfcompress inspect DIR                                  methods, bits per weight, sizes per module type

User errors (bad recipe, missing file, existing output ...) print one line and exit 2; failures
exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from .errors import UserError

logger = logging.getLogger("hfcompress")

DEFAULT_RECIPE = "w4g64-gptq"
SAVE_FORMATS = ("auto", "native", "compressed-tensors")  # as hfcompress.formats.save, without importing torch
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse turns the error into exit 2 and one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _device(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1 ...)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: this machine has no such CUDA device "
                                         f"({torch.cuda.device_count()} visible); use cpu")
    return text


def _add_model_args(parser: argparse.ArgumentParser, dtype_default: str) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                        help=f"dtype to load the weights in (default: {dtype_default})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model code from the checkpoint's repository to run (off unless asked)")


def _add_eval_args(parser: argparse.ArgumentParser, data_help: str) -> None:
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--split", default="test", help="dataset split, for dataset names (default: test)")
    parser.add_argument("--config-name", help="dataset configuration, for dataset names")
    parser.add_argument("--text-column", default="text", help="dataset text column (default: text)")
    parser.add_argument("--seq-len", type=_positive, default=2048, help="tokens per window (default: 2048)")
    parser.add_argument("--stride", type=_positive, help="strided windows instead of non-overlapping ones")
    parser.add_argument("--max-windows", type=_positive, help="evaluate only the first N windows")
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="what the perplexity forwards compute in (default auto: the model's dtype where the "
                             "hardware has it, else float32; bfloat16/float16: autocast)")
    parser.add_argument("--batch-size", type=_positive, default=1, help="windows per forward pass (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description="Compress transformers models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on failure")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    comp = sub.add_parser("compress", help="compress a model with a recipe and save it",
                          description="Compress MODEL (a folder, a .gguf file or a Hub id; default: the bundled "
                                      "SmolLM2-135M-Instruct) with a recipe and save it.")
    comp.add_argument("model", nargs="?", help="model folder, .gguf file or Hub id (default: bundled SmolLM2-135M)")
    comp.add_argument("--recipe", default=DEFAULT_RECIPE,
                      help=f"recipe YAML file or bundled recipe name (default: {DEFAULT_RECIPE})")
    comp.add_argument("--output", help="output folder (default: <model>-<recipe> in the current folder)")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    comp.add_argument("--format", dest="save_format", choices=SAVE_FORMATS, default="auto",
                      help="auto (default): compressed-tensors, which stock transformers and vLLM load, whenever it "
                           "holds the model exactly, else native; native: hfcompress's own format (loads only with "
                           "hfcompress); compressed-tensors: that, or an error saying why not")
    comp.add_argument("--calibration-data", help="calibration data for GPTQ: a text file, a folder, a dataset name, "
                                                 "or a .safetensors file of token windows (input_ids [n, seq_len]); "
                                                 "overrides the recipe's calibration.data")
    comp.add_argument("--resume", action="store_true",
                      help="continue an interrupted run from its last finished layer (state in OUTPUT.resume)")
    comp.add_argument("--layerwise", action="store_true",
                      help="never hold the whole model in memory: read a safetensors checkpoint one decoder block at "
                           "a time and write the output tensor by tensor (quantize stages; no perplexity "
                           "measurement; for models larger than memory)")
    comp.add_argument("--device", type=_device,
                      help="where blocks are computed during calibration, e.g. cuda (default: cpu)")
    _add_model_args(comp, "bfloat16")
    _add_eval_args(comp, "measure perplexity on this text before and after (default for the bundled model: "
                         "the bundled evaluation text; otherwise no evaluation)")
    comp.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")

    ev = sub.add_parser("eval", help="perplexity of a causal LM on a text",
                        description="Perplexity of MODEL on DATA (GPTQ protocol: non-overlapping windows).")
    ev.add_argument("model", nargs="?", help="model folder, .gguf file or Hub id (default: bundled SmolLM2-135M)")
    _add_model_args(ev, "auto")
    _add_eval_args(ev, "text file, folder of .txt files, dataset name (or wikitext2); default: bundled text")
    ev.add_argument("--json", dest="json_file", help="also write the result as JSON to this file")

    exp = sub.add_parser("export", help="convert a saved hfcompress folder for serving engines",
                         description="Export DIR to the GPTQ v1 or compressed-tensors (pack-quantized) format.")
    exp.add_argument("folder", help="a folder saved by hfcompress")
    exp.add_argument("--format", required=True, choices=("gptq", "compressed-tensors"), help="target format")
    exp.add_argument("--output", required=True, help="output folder")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")

    from .planning.commands import add_plan_parser, add_report_parser

    add_plan_parser(sub)
    add_report_parser(sub)

    ins = sub.add_parser("inspect", help="what was done to a saved model, its sizes and bits per weight")
    ins.add_argument("folder", help="a saved model folder")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _eval_options(args) -> dict:
    return {"seq_len": args.seq_len, "stride": args.stride, "max_windows": args.max_windows,
            "compute_dtype": args.compute_dtype, "batch_size": args.batch_size, "split": args.split,
            "config_name": args.config_name, "text_column": args.text_column}


def _eval_data(args, model_given: bool):
    from .data import bundled_text

    if args.data:
        return args.data
    return None if model_given else bundled_text("evaluation")


def _default_output(source, recipe_arg: str) -> Path:
    from .io import resolve_model_source

    resolved = resolve_model_source(source)
    name = Path(resolved.gguf_file or resolved.path).stem if not resolved.hub_id else resolved.hub_id.split("/")[-1]
    return Path(f"{name.split('.')[0]}-{Path(recipe_arg).stem}")


def _float_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = id(tensor) if tensor.is_meta else tensor.data_ptr()  # tensors on disk (meta) share no storage
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _source_size(source) -> tuple[int | None, str]:
    """Bytes of the checkpoint files the model was loaded from, and what they are."""
    root = Path(source.path)
    if source.gguf_file:
        from gguf import LlamaFileType

        from .io import gguf_metadata

        path = root / source.gguf_file
        file_type = gguf_metadata(path).get("general.file_type")
        kind = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "?"
        return path.stat().st_size, f"GGUF {kind}"
    files = [f for pattern in ("*.safetensors", "*.bin") for f in root.glob(pattern)] if root.is_dir() else []
    return (sum(f.stat().st_size for f in files) or None), "checkpoint files"


READERS = {
    "compressed-tensors": "loads in stock transformers (with the compressed-tensors package), vLLM, SGLang and hfcompress",
    "native": "hfcompress's own format: loads only where hfcompress is imported (see the log for why)",
    None: "a plain transformers checkpoint: loads anywhere",
}


def _print_summary(model, output: Path, source, size_before: int, args, before, after, data_name) -> None:
    from .report import format_bytes, summarize_folder

    summary = summarize_folder(output)
    fmt = getattr(model, "hfcompress_saved_format", None)
    file_bytes, kind = _source_size(source)
    baseline = (f"{format_bytes(file_bytes)} on disk ({kind}; {format_bytes(size_before)} as loaded in {args.dtype})"
                if file_bytes else f"{format_bytes(size_before)} as loaded in {args.dtype}")
    print(f"format:     {fmt or 'plain'}: {READERS[fmt]}")
    print(f"size:       {baseline} -> {format_bytes(summary['folder_bytes'])} on disk "
          f"({summary['bits_per_weight']:.2f} bits per weight)")
    if after is not None:
        note = f"; the baseline is the {kind} file dequantized, not the original float model" if source.gguf_file else ""
        print(f"perplexity: {before.perplexity:.3f} -> {after.perplexity:.3f} on {data_name} "
              f"({after.windows} windows of {after.seq_len} tokens){note}")
    where = str(output)
    load = ("import hfcompress; " if fmt == "native" else "") + \
        f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{where}')"
    print(f"saved:      {output.resolve()}")
    print("next:")
    print(f"  load:     python -c \"{load}\"")
    print(f"  evaluate: hfcompress eval {where} --data wikitext2")
    print(f"  inspect:  hfcompress inspect {where}")
    print(f"  export:   hfcompress export {where} --format gptq --output {where}-gptq")
    if fmt != "native":
        print(f"  serve:    vllm serve {where}   (GPU; README: Formats and serving)")


def _calibration_shape(calibration, data) -> tuple[int, int]:
    """``(windows, tokens per window)`` the calibration will use: a file of ready windows is used whole."""
    data = data or calibration.data
    if isinstance(data, str) and data.endswith(".safetensors") and Path(data).is_file():
        from .calibration import windows_file_shape

        return windows_file_shape(data)
    return calibration.samples, calibration.seq_len


def _announce_calibration(model, recipe, device, data=None) -> None:
    """Say before a calibrated stage starts how long it will take here (it can be long on a CPU)."""
    import torch

    from .calibration import estimate_calibration_seconds
    from .precision import model_compute_dtype
    from .recipe import CalibrationConfig

    if not any(stage.needs_calibration for stage in recipe.stages):
        return
    calibration = recipe.calibration or CalibrationConfig()
    device = torch.device(device) if device else None
    dtype = model_compute_dtype(model, calibration.compute_dtype, device)
    samples, seq_len = _calibration_shape(calibration, data)
    window, total = estimate_calibration_seconds(model, samples, seq_len, dtype, device)
    precision = f"computed in {str(dtype).removeprefix('torch.')}" if dtype else "computed in the model's dtype"
    duration = "under a minute" if total < 60 else f"about {round(total / 60)} minute{'s' if total >= 90 else ''}"
    logger.info("calibrating on %d windows of %d tokens, %s: %s on this machine (one window through every block "
                "takes %.1f s); --recipe w4g64-rtn takes about a minute, with a larger perplexity loss",
                samples, seq_len, precision, duration, window)


def run_compress(args) -> int:
    from .io import check_output
    from .output import output_lock
    from .recipe import Recipe

    from . import distributed

    recipe = Recipe.load(args.recipe)  # validate before the slow steps
    output = Path(args.output) if args.output else _default_output(args.model, args.recipe)
    sources = [args.model] if args.model and Path(args.model).exists() else []  # never written over
    distributed.init_from_environment(args.device)  # under torchrun / accelerate launch: one of several
    if not distributed.is_main():  # calibrates its share of the windows; rank 0 alone writes the output
        return (_compress_layerwise if args.layerwise else _compress_to)(args, recipe, output, sources)
    check_output(output, args.overwrite, sources)
    with output_lock(output):  # one run per output, from here to the final rename
        if args.layerwise:
            return _compress_layerwise(args, recipe, output, sources)
        return _compress_to(args, recipe, output, sources)


def _complete_record(config, source) -> None:
    """What compress() cannot know of the model's origin: its Hub id and license, from the source."""
    from .io import read_license

    if config.base_model is None:
        config.base_model = source.hub_id
    if config.license is None:
        config.license = read_license(source)


def _compress_layerwise(args, recipe, output: Path, sources: list) -> int:
    """``compress --layerwise``: the model built empty, its blocks read from disk one at a time."""
    import shutil
    import tempfile

    from . import compress, distributed
    from .config import CompressionConfig
    from .io import load_processor, load_tokenizer, model_class, resolve_model_source
    from .layerwise import LayerwiseError, check_recipe, open_on_disk, save_on_disk
    from .output import atomic_output

    check_recipe(recipe)
    if args.resume:
        raise UserError("--resume: a layer-wise run keeps no resume state yet; run without --resume")
    source = resolve_model_source(args.model)
    if source.gguf_file:
        raise LayerwiseError(f"{source.gguf_file}: --layerwise reads safetensors checkpoints; a .gguf file is "
                             "dequantized whole on load: drop --layerwise")
    if not args.no_eval and distributed.is_main():
        logger.info("--layerwise: no perplexity measurement (it needs the whole model); run hfcompress eval on "
                    "the output")
    spill = Path(tempfile.mkdtemp(prefix=f".{output.name}.layerwise-", dir=output.absolute().parent))
    try:
        model = open_on_disk(source.path, model_class(source, args.trust_remote_code), dtype=args.dtype,
                             spill=spill, trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(source, args.trust_remote_code)
        size_before = _float_bytes(model)
        config = CompressionConfig()
        compress(model, recipe, tokenizer=tokenizer, calibration_data=args.calibration_data, device=args.device,
                 config=config)
        if not distributed.is_main():
            return 0
        _complete_record(config, source)
        processor = load_processor(source, trust_remote_code=args.trust_remote_code)
        with atomic_output(output, args.overwrite, sources) as staging:
            save_on_disk(model, staging, save_format=args.save_format)
            if processor is not None:
                processor.save_pretrained(staging)
            elif tokenizer is not None:
                tokenizer.save_pretrained(staging)
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    _print_summary(model, output, source, size_before, args, None, None, None)
    return 0


def _compress_to(args, recipe, output: Path, sources: list) -> int:
    from . import compress
    from .config import CompressionConfig
    from .data import check_text_source, describe_text_source
    from .evaluation import evaluate_perplexity
    from .io import load_model, load_processor, save_compressed

    from . import distributed

    main = distributed.is_main()
    resume_dir = Path(f"{output}.resume") if not distributed.active() else None  # one process keeps checkpoints
    if args.resume and resume_dir is None:
        raise UserError("--resume: runs over several processes keep no resume state; run without --resume")
    if resume_dir is not None and resume_dir.exists() and not args.resume:
        raise UserError(f"{resume_dir} holds an interrupted run: pass --resume to continue it, or delete it to start over")
    if args.calibration_data:
        check_text_source(args.calibration_data)
        if args.calibration_data.endswith(".safetensors"):
            from .calibration import windows_file_shape

            windows_file_shape(args.calibration_data)  # before the model loads
    data = None if args.no_eval or not main else _eval_data(args, args.model is not None)
    check_text_source(data)
    model, tokenizer, source = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if data is not None and tokenizer is None:
        raise UserError("perplexity needs a tokenizer and none was found with the model: pass --no-eval")
    size_before = _float_bytes(model)
    before = evaluate_perplexity(model, tokenizer, data, **_eval_options(args)) if data is not None else None
    if main:
        _announce_calibration(model, recipe, args.device, args.calibration_data)
    config = CompressionConfig()  # filled in by compress(); the card and config.json read this same record
    compress(model, recipe, tokenizer=tokenizer, calibration_data=args.calibration_data, resume_dir=resume_dir,
             device=args.device, config=config)
    _complete_record(config, source)
    after = evaluate_perplexity(model, tokenizer, data, **_eval_options(args)) if data is not None else None
    if after is not None:
        config.metrics["perplexity"] = {**after.to_dict(), "dataset": describe_text_source(
            data, split=args.split, config_name=args.config_name)}
        config.metrics["perplexity_before_compression"] = before.perplexity
    if not main:
        return 0
    processor = load_processor(source, trust_remote_code=args.trust_remote_code)
    save_compressed(model, output, tokenizer, overwrite=args.overwrite, processor=processor,
                    save_format=args.save_format, sources=sources)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    _print_summary(model, output, source, size_before, args, before, after,
                   describe_text_source(data, split=args.split, config_name=args.config_name) if data else None)
    return 0


def _check_writable_file(path: Path) -> None:
    import os

    if path.is_dir():
        raise UserError(f"--json {path} is a folder; give a file name, e.g. {path / 'perplexity.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--json {path}: {parent} is not a writable folder")


def run_eval(args) -> int:
    from .data import check_text_source
    from .evaluation import evaluate_perplexity
    from .io import load_model

    data = _eval_data(args, model_given=False)
    check_text_source(data)
    if args.json_file:  # before the evaluation, not after it
        _check_writable_file(Path(args.json_file))
    model, tokenizer, source = load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    if not model.can_generate():
        raise UserError(f"perplexity needs a causal language model; {type(model).__name__} is not one")
    result = evaluate_perplexity(model, tokenizer, data, **_eval_options(args))
    record = {"model": args.model or source.hub_id, "data": str(data), **result.to_dict()}
    text = json.dumps(record, indent=2)
    if args.json_file:
        Path(args.json_file).write_text(text + "\n", encoding="utf-8")
    if sys.stdout.isatty():
        width = max(len(k) for k in record)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in record.items()))
    else:
        print(text)
    return 0


def run_export(args) -> int:
    from .export import export_model

    out = export_model(args.folder, args.format, args.output, overwrite=args.overwrite)
    print(f"exported {args.folder} to {out} ({args.format})")
    return 0


def run_inspect(args) -> int:
    from .output import recover_output
    from .report import format_summary, summarize_folder

    recover_output(args.folder)  # an output a killed run left half-replaced is put back first (and said so)
    summary = summarize_folder(args.folder)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def run_plan(args) -> int:
    from .planning.commands import run_plan as plan

    return plan(args)


def run_report(args) -> int:
    from .planning.commands import run_report as report

    return report(args)


COMMANDS = {"compress": run_compress, "eval": run_eval, "export": run_export, "inspect": run_inspect,
            "plan": run_plan, "report": run_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        return _run(args)
    finally:
        logger.removeHandler(handler)  # main() called again in one process logs once, to its own stderr


def _run(args) -> int:
    try:
        return COMMANDS[args.command](args)
    except UserError as err:
        print(f"hfcompress: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hfcompress: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failure of ours, not of the input: say so, with the traceback on -v
        logger.debug("traceback", exc_info=True)
        print(f"hfcompress: failed: {type(err).__name__}: {err}" + ("" if args.verbose else " (-v for the traceback)"),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
