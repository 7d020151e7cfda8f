"""Model cards: the ``README.md`` that makes a pushed repository describe itself.

The card carries Hub metadata (base model, library, tags) in its YAML header, and in its body
the recipe, the bits per weight, sizes per module type and the perplexity when one was measured.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .models import linear_shape
from .report import format_bytes, summarize_folder


def _linear_shapes(model) -> dict[str, tuple[int, int]]:
    config = model.config.quantization_config
    shapes = {}
    for name in config.modules:
        module = model.get_submodule(name)
        shapes[name] = (module.in_features, module.out_features) if hasattr(module, "in_features") else linear_shape(module)
    return shapes


def _tags(config) -> list[str]:
    tags = ["hfcompress", "compressed"]
    for stage in config.recipe.stages if config.recipe else []:
        if stage.name == "quantize":
            tags += [stage.method, f"{stage.bits}-bit", "quantized"]
    return list(dict.fromkeys(tags))


def build_model_card(model, directory: str | os.PathLike) -> ModelCard:
    """A card for ``model`` as saved in ``directory`` (sizes are read from the files there)."""
    config = model.config.quantization_config
    summary = summarize_folder(directory, _linear_shapes(model))
    data = ModelCardData(
        base_model=config.base_model,
        library_name="transformers",
        tags=_tags(config) + list(getattr(model, "model_tags", None) or []),
        pipeline_tag="text-generation" if model.can_generate() else None,
    )
    rows = "\n".join(
        f"| {kind} | {e['params']:,} | {format_bytes(e['bytes'])} | "
        f"{e['bits_per_weight'] if e['bits_per_weight'] is not None else '-'} |"
        for kind, e in sorted(summary["by_type"].items())
    )
    metrics = ""
    for name, value in sorted(config.metrics.items()):
        metrics += f"- **{name}**: `{value}`\n"
    base = f"[{config.base_model}](https://huggingface.co/{config.base_model})" if config.base_model else "a local checkpoint"
    source = config.base_model or getattr(model.config, "_name_or_path", "") or "model"
    title = f"{Path(source).name} ({', '.join(summary['methods']) or 'compressed'}, hfcompress)"
    recipe_yaml = config.recipe.to_yaml() if config.recipe else "# no recipe recorded\n"
    body = f"""
# {title}

Compressed from {base} with hfcompress.
It loads with plain transformers once the plugin is imported:

```python
import hfcompress  # registers quant_method "hfcompress"
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this repository>")
```

## Size

{summary['params']:,} weights in {format_bytes(summary['tensor_bytes'])} of tensors: \
**{summary['bits_per_weight']} bits per weight** overall.

| module type | weights | size | bits per weight |
|---|---:|---:|---:|
{rows}

## Evaluation

{metrics or "No evaluation was recorded when this model was saved."}

## Recipe

```yaml
{recipe_yaml}```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(model, directory: str | os.PathLike) -> Path:
    """Write ``README.md`` into ``directory`` (which already holds the saved model)."""
    path = Path(directory) / "README.md"
    build_model_card(model, directory).save(path)
    return path
