"""Model cards: the ``README.md`` that makes a saved or pushed folder describe itself.

The card is built from the folder: its format from ``config.json``'s ``quantization_config``,
what was done from the hfcompress record (``CompressionConfig.to_dict()``), which is the
``quantization_config`` itself in our native format and a top-level ``"hfcompress"`` entry of
``config.json`` in compressed-tensors folders ``save_pretrained`` writes. Folders that hold no
record are given one by the caller: a plain checkpoint (uniform pruning) the model's, an export
(``hfcompress export``) the record of the folder it was exported from.

The YAML header follows the Hub's conventions: ``base_model`` with ``base_model_relation``,
``library_name``, ``pipeline_tag``, ``license`` (the source model's), tags, and a ``model-index``
entry per measured perplexity. The body says which libraries load the folder, with a snippet
naming the repository (or the folder), the sizes, the metrics and the recipe. No local path
appears in a card: datasets are named, and paths in a recipe are cut to their base names.

Example (on a folder saved by ``save_pretrained``)::

    write_folder_card("my-model-w4", repo_id="me/my-model-w4")
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .config import compression_record, recorded_stages
from .data import WIKITEXT2_NAME
from .errors import CheckpointError
from .formats.folder import RECORD_KEY, load_config_file
from .models import linear_shape
from .output import final_name
from .recipe import Recipe
from .report import format_bytes, summarize_folder

# A plot of size against quality that ``hfcompress report --card`` puts in a folder; the card shows it.
FRONTIER_PNG = "frontier.png"

# Hub datasets behind the names hfcompress records: (dataset id, configuration, split).
HUB_DATASETS = {WIKITEXT2_NAME: ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")}

# base_model_relation. The Hub knows four: adapter, merge, quantized, finetune, and takes one.
# The card names the largest change a recipe made to the base model's weights:
#   finetune   weights cut (prune) or trained (distill): no longer the base model's weights;
#   merge      weights of several layers (or the two embedding tables) made one (share);
#   quantized  the base model's own weights, only rounded to a grid (quantize).
RELATION_OF_STAGE = {"prune": "finetune", "distill": "finetune", "share": "merge", "quantize": "quantized"}
RELATION_ORDER = ("finetune", "merge", "quantized")  # first wins when several stages ran
STAGE_TAGS = {"rotate": "rotated", "prune": "pruned", "distill": "distilled", "share": "weight-sharing"}

# (transformers' table of class names, Hub pipeline tag), most specific first: vision-language
# classes are also listed as causal LMs, encoder-decoders also as masked LMs.
TASKS = (
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "image-text-to-text"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "automatic-speech-recognition"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering"),
    ("MODEL_MAPPING_NAMES", "feature-extraction"),
)
# Class names of remote code, which no table lists: by suffix.
TASK_SUFFIXES = (("ForCausalLM", "text-generation"), ("LMHeadModel", "text-generation"),
                 ("ForMaskedLM", "fill-mask"), ("Model", "feature-extraction"))
AUTO_CLASSES = {
    "image-text-to-text": "AutoModelForImageTextToText", "text-generation": "AutoModelForCausalLM",
    "text2text-generation": "AutoModelForSeq2SeqLM", "automatic-speech-recognition": "AutoModelForSpeechSeq2Seq",
    "fill-mask": "AutoModelForMaskedLM", "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification", "question-answering": "AutoModelForQuestionAnswering",
}
GENERATIVE = ("text-generation", "image-text-to-text")


@dataclass(frozen=True)
class LoadingGuide:
    """How a folder of one format loads: who reads it, what to install, and the snippets."""

    readers: str
    install: str
    preamble: str = ""  # lines before from_pretrained
    servers: tuple[str, ...] = ()  # serving commands for generative models; {repo} is filled in
    tag: str | None = None


# Keyed by config.json's quantization_config.quant_method (None: no quantization_config).
LOADING = {
    "hfcompress": LoadingGuide(
        "This folder is in hfcompress's native format: transformers loads it once hfcompress is imported "
        "(it registers the `hfcompress` quantization method). For serving engines, export it: "
        "`hfcompress export FOLDER --format compressed-tensors|gptq --output OUT`.",
        "pip install hfcompress",
        'import hfcompress  # registers quant_method "hfcompress"\n'),
    "compressed-tensors": LoadingGuide(
        "This folder is in the compressed-tensors format (`pack-quantized`): stock transformers loads it with "
        "the `compressed-tensors` package, vLLM serves it, and hfcompress reads it too (bit-identical weights).",
        "pip install transformers compressed-tensors", servers=("vllm serve {repo}",), tag="compressed-tensors"),
    "gptq": LoadingGuide(
        "This folder is a GPTQ (v1) checkpoint: transformers loads it with GPTQModel (through optimum), "
        "and vLLM and SGLang serve it.",
        "pip install transformers optimum gptqmodel",
        servers=("vllm serve {repo}", "python -m sglang.launch_server --model-path {repo}"), tag="gptq"),
    None: LoadingGuide(
        "This folder is a plain transformers checkpoint: nothing beyond transformers is needed to load it.",
        "pip install transformers", servers=("vllm serve {repo}",)),
}


def read_record(config: dict) -> dict | None:
    """The hfcompress record of a folder's ``config.json`` (as a dict), or None."""
    qconfig = config.get("quantization_config") or {}
    if qconfig.get("quant_method") == "hfcompress":
        return qconfig
    return config.get(RECORD_KEY)


def pipeline_tag(config: dict) -> str | None:
    """The Hub pipeline tag of a model, from ``config.json``'s ``architectures``.

    >>> pipeline_tag({"architectures": ["LlamaForCausalLM"]}), pipeline_tag({"architectures": ["BertModel"]})
    ('text-generation', 'feature-extraction')
    """
    from transformers.models.auto import modeling_auto

    for arch in config.get("architectures") or []:
        for table, tag in TASKS:
            for names in getattr(modeling_auto, table).values():
                if arch in (names if isinstance(names, (list, tuple)) else (names,)):
                    return tag
        for suffix, tag in TASK_SUFFIXES:
            if arch.endswith(suffix):
                return tag
    return None


def base_model_relation(record: dict) -> str | None:
    """The relation to the base model (see ``RELATION_OF_STAGE``), from the recipe's stages and
    what earlier compressions recorded (``pruned``, ``shared``).

    >>> base_model_relation({"recipe": {"stages": [{"prune": {"ffn": 0.25}}, {"quantize": {"bits": 4}}]}})
    'finetune'
    """
    names = [name for name, _ in recorded_stages(record)]
    names += ["prune"] * bool(record.get("pruned")) + ["share"] * bool(record.get("shared"))
    relations = {RELATION_OF_STAGE[name] for name in names if name in RELATION_OF_STAGE}
    return next((relation for relation in RELATION_ORDER if relation in relations), None)


def _stages(record: dict) -> list[tuple[str, dict]]:
    return recorded_stages(record)


def _describe_stage(name: str, options: dict) -> str:
    if name == "quantize":
        group = options.get("group_size", 128)
        return (f"{options.get('method', 'rtn').upper()} {options.get('bits', 4)}-bit weights, "
                + (f"group size {group}" if group != -1 else "one group per row")
                + (", after AWQ's activation-aware scaling" if options.get("awq") else "")
                + (", calibrated against the float model's outputs (GPTAQ)" if options.get("asymmetric") else ""))
    if name == "rotate":  # the same function, re-parameterized: no relation of its own to the base model
        return f"{options.get('method', 'hadamard')} rotation of the residual stream, folded into the weights"
    return {"prune": "structured pruning", "distill": "distillation", "share": "weight sharing"}.get(name, name)


def card_tags(record: dict, fmt: str | None) -> list[str]:
    tags = ["hfcompress"]
    for name, options in _stages(record):
        if name == "quantize":
            tags += [options.get("method", "rtn"), f"{options.get('bits', 4)}-bit"]
        elif name in STAGE_TAGS:
            tags.append(STAGE_TAGS[name])
    if LOADING[fmt].tag:
        tags.append(LOADING[fmt].tag)
    return list(dict.fromkeys(tags))


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("~", ".")) or os.path.exists(value)


def without_local_paths(value):
    """``value`` (nested dicts and lists of a recipe or metrics) with every local path cut to its
    base name: a path names the user's folders, and nothing on the reader's machine."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        return Path(value).name
    return value


def _perplexities(metrics: dict) -> list[dict]:
    """The measured perplexities as rows: metric, value, dataset, how it was measured."""
    main = metrics.get("perplexity")
    main = main if isinstance(main, dict) else {"perplexity": main} if main is not None else {}
    # Records written before datasets were named kept the path of the text ("data").
    dataset = main.get("dataset") or (Path(str(main["data"])).name if main.get("data") else None)
    rows = []
    for name, value in sorted(metrics.items()):
        value = value.get("perplexity") if isinstance(value, dict) else value
        if not name.startswith("perplexity") or not isinstance(value, (int, float)):
            continue
        protocol = ""
        if name == "perplexity" and main.get("windows"):
            protocol = f"{main['windows']} windows of {main['seq_len']} tokens" + (
                f", stride {main['stride']}" if main.get("stride") else "")
        rows.append({"metric": name.replace("_", " "), "value": value, "dataset": dataset, "protocol": protocol,
                     "this_model": name == "perplexity"})
    return rows


def _eval_results(rows: list[dict], task: str | None) -> list[EvalResult]:
    results = []
    for row in rows:
        if not row["this_model"] or not row["dataset"]:
            continue  # the model-index describes this model, on a named dataset
        hub_id, hub_config, split = HUB_DATASETS.get(row["dataset"], (None, None, None))
        slug = re.sub(r"[^a-z0-9]+", "-", row["dataset"].lower()).strip("-")
        results.append(EvalResult(task_type=task or "text-generation", dataset_type=hub_id or slug,
                                  dataset_name=row["dataset"], dataset_config=hub_config, dataset_split=split,
                                  metric_type="perplexity", metric_name="Perplexity",
                                  metric_value=round(float(row["value"]), 4)))
    return results


def _metrics_section(rows: list[dict]) -> str:
    if not rows:
        return "No evaluation was recorded when this model was saved."
    lines = ["| metric | value | dataset | measured on |", "|---|---:|---|---|"]
    lines += [f"| {r['metric']} | {r['value']:.3f} | {r['dataset'] or '-'} | {r['protocol'] or '-'} |" for r in rows]
    return "\n".join(lines)


def _size_section(directory: Path, fmt: str | None, record: dict, linear_shapes: dict | None) -> str:
    if fmt not in ("hfcompress", "compressed-tensors", None):  # report.py reads these two packings only
        files = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        groups = "; ".join(f"{len(g['modules'])} linear layers at {g['bits']} bits, group size {g['group_size']}"
                           for g in record.get("quantized", []))
        return f"{format_bytes(files)} of safetensors" + (f" ({groups})." if groups else ".")
    summary = summarize_folder(directory, linear_shapes)
    rows = "\n".join(
        f"| {kind} | {e['params']:,} | {format_bytes(e['bytes'])} | "
        f"{e['bits_per_weight'] if e['bits_per_weight'] is not None else '-'} |"
        for kind, e in sorted(summary["by_type"].items()))
    return (f"{summary['params']:,} weights in {format_bytes(summary['tensor_bytes'])} of tensors: "
            f"**{summary['bits_per_weight']} bits per weight** overall.\n\n"
            "| module type | weights | size | bits per weight |\n|---|---:|---:|---:|\n" + rows)


def _frontier_section(directory: Path) -> str:
    if not (directory / FRONTIER_PNG).is_file():
        return ""
    return (f"\n\n![Saved size against perplexity of this model's recipe and others]({FRONTIER_PNG})\n\n"
            "Size against quality of the recipes compared by `hfcompress report`.\n")


def _loading_section(guide: LoadingGuide, repo: str, task: str | None) -> str:
    auto = AUTO_CLASSES.get(task, "AutoModel")
    snippet = f"{guide.preamble}from transformers import {auto}\n\nmodel = {auto}.from_pretrained(\"{repo}\")\n"
    text = f"{guide.readers}\n\n```bash\n{guide.install}\n```\n\n```python\n{snippet}```\n"
    if guide.servers and task in GENERATIVE:
        commands = "\n".join(command.format(repo=repo) for command in guide.servers)
        text += f"\nTo serve it:\n\n```bash\n{commands}\n```\n"
    return text


def _folder_name(directory: Path) -> str:
    """The folder's name once written (saves and exports write a staging folder and rename it)."""
    return final_name(directory) or directory.resolve().name


def build_folder_card(directory: str | os.PathLike, record: dict | None = None, repo_id: str | None = None,
                      tags: list[str] | tuple[str, ...] = (), linear_shapes: dict | None = None) -> ModelCard:
    """The card of the saved folder ``directory``. ``record``: what hfcompress did, when the
    folder holds none (a plain checkpoint); ``repo_id``: the Hub repository it is pushed to."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json; not a saved model folder")
    config = load_config_file(config_path)
    fmt = (config.get("quantization_config") or {}).get("quant_method")
    if fmt not in LOADING:
        raise CheckpointError(f"{directory}: no model card for quant_method {fmt!r}; known: hfcompress, "
                              "compressed-tensors, gptq, or none")
    record = dict(read_record(config) or record or {})
    for key in ("recipe", "metrics"):
        record[key] = without_local_paths(record.get(key))
    repo = repo_id or _folder_name(directory)
    task = pipeline_tag(config)
    base_model = record.get("base_model")
    rows = _perplexities(record.get("metrics") or {})
    data = ModelCardData(
        base_model=base_model,
        base_model_relation=base_model_relation(record) if base_model else None,
        library_name="transformers",
        pipeline_tag=task,
        license=record.get("license"),
        tags=list(dict.fromkeys(card_tags(record, fmt) + list(tags))),
    )
    results = _eval_results(rows, task)
    if results:
        data.model_name, data.eval_results = repo, results
    stages = "; ".join(_describe_stage(name, options) for name, options in _stages(record)) or "no recipe recorded"
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    recipe = Recipe.from_dict(record["recipe"]).to_yaml() if record.get("recipe") else "# no recipe recorded\n"
    body = f"""
# {repo.split("/")[-1]}

{base} compressed with [hfcompress](https://pypi.org/project/hfcompress/) ({stages}).

## How to load

{_loading_section(LOADING[fmt], repo, task)}
## Size

{_size_section(directory, fmt, record, linear_shapes)}

## Evaluation

{_metrics_section(rows)}{_frontier_section(directory)}

## Recipe

```yaml
{recipe}```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_folder_card(directory: str | os.PathLike, repo_id: str | None = None,
                      record: dict | None = None) -> Path:
    """Write ``README.md`` into the saved folder ``directory`` (replacing any card there). An
    export, whose ``config.json`` holds no hfcompress record, passes its source folder's:
    ``write_folder_card(output, record=source_config["quantization_config"])``."""
    path = Path(directory) / "README.md"
    build_folder_card(directory, record=record, repo_id=repo_id).save(path)
    return path


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name in getattr(getattr(model.config, "quantization_config", None), "modules", None) or {}:
        module = model.get_submodule(name)
        shapes[name] = (module.in_features, module.out_features) if hasattr(module, "in_features") else linear_shape(module)
    return shapes


def build_model_card(model, directory: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """A card for ``model`` as saved in ``directory``, with the model's own record when the folder
    holds none (a plain checkpoint) and the tags given to ``push_to_hub``."""
    return build_folder_card(directory, record=compression_record(model).to_dict(), repo_id=repo_id,
                             tags=list(getattr(model, "model_tags", None) or []),
                             linear_shapes=_linear_shapes(model))


def write_model_card(model, directory: str | os.PathLike, repo_id: str | None = None) -> Path:
    """Write ``README.md`` into ``directory`` (which already holds the saved model)."""
    path = Path(directory) / "README.md"
    build_model_card(model, directory, repo_id=repo_id).save(path)
    return path
