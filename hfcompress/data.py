"""Text for calibration, training and evaluation: a file, a folder of .txt files, or a dataset.

Files are read in Python text mode (universal newlines), the way the GPTQ paper's evaluation
reads WikiText-2. Folders and dataset rows are joined with a blank line.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = (folder / "a.txt").write_text("first"); _ = (folder / "b.txt").write_text("second")
>>> load_text(folder)
'first\\n\\nsecond'
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

SEPARATOR = "\n\n"
# Short names for the standard corpora: name -> (dataset, config, split). They need the Hub.
DATASET_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "test")}


def bundled_text(name: str) -> Path:
    """Path of a text shipped with the package: ``calibration`` or ``evaluation`` (public domain)."""
    path = importlib.resources.files("hfcompress") / "texts" / f"{name}.txt"
    return Path(os.fspath(path))


# Names fit to publish (model cards, recorded metrics) for the texts users evaluate on most.
WIKITEXT2_NAME = "WikiText-2 (raw, test)"
BUNDLED_TEXT_NAMES = {
    "calibration": "Northanger Abbey by Jane Austen (opening chapters, bundled with hfcompress)",
    "evaluation": "Persuasion by Jane Austen (opening chapters, bundled with hfcompress)",
}


def describe_text_source(data: Any, *, split: str = "test", config_name: str | None = None) -> str:
    """A name for ``data`` that can be published: never a local path (which says nothing to
    readers and exposes the user's folders). WikiText-2 is named as such, from its alias, its
    dataset id or its usual file name; the bundled texts by title; other files and folders by
    their base name; dataset names as given, with configuration and split.

    >>> describe_text_source("wikitext2")
    'WikiText-2 (raw, test)'
    >>> describe_text_source("/home/me/data/wikitext-2-raw/wiki.test.raw")
    'WikiText-2 (raw, test)'
    >>> describe_text_source(bundled_text("evaluation"))
    'Persuasion by Jane Austen (opening chapters, bundled with hfcompress)'
    >>> describe_text_source("/home/me/notes/my-eval.txt")
    'my-eval.txt'
    >>> describe_text_source("allenai/c4", config_name="en", split="validation")
    'allenai/c4 (en, validation)'
    """
    if not isinstance(data, (str, os.PathLike)):
        info = getattr(data, "info", None)
        return getattr(info, "dataset_name", None) or type(data).__name__
    text = os.fspath(data)
    if text in DATASET_ALIASES:
        text, config_name, split = DATASET_ALIASES[text]
    if text.rsplit("/", 1)[-1] == "wikitext" and config_name == "wikitext-2-raw-v1" and split == "test":
        return WIKITEXT2_NAME
    path = Path(text).expanduser()
    for name, title in BUNDLED_TEXT_NAMES.items():
        if path.exists() and path.resolve() == bundled_text(name).resolve():
            return title
    if path.name == "wiki.test.raw":
        return WIKITEXT2_NAME
    if path.exists() or text.startswith((".", "/", "~")):
        return path.resolve().name
    details = ", ".join(part for part in (config_name, split) if part)
    return f"{text} ({details})" if details else text


def _join_rows(dataset: Any, text_column: str) -> str:
    if text_column not in dataset.column_names:
        raise DataError(
            f"the dataset has no column {text_column!r}; its columns are {', '.join(dataset.column_names)}: "
            "name the text column (text_column=..., --text-column)"
        )
    return SEPARATOR.join(row for row in dataset[text_column] if row)


def _pick_split(dataset: Any, split: str) -> Any:
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DataError(f"the dataset has no split {split!r}; its splits are {', '.join(dataset)}")
        return dataset[split]
    return dataset


_PATH_SUFFIXES = (".txt", ".raw", ".text", ".md", ".json", ".jsonl", ".csv", ".parquet", ".safetensors")


def check_text_source(data: Any) -> None:
    """Fail early, before a model loads, when ``data`` is clearly a path that does not exist."""
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(_PATH_SUFFIXES)
        if looks_like_path and not Path(text).expanduser().exists():
            raise DataError(f"{text}: no such file or folder (expected a text file, a folder of .txt files or a dataset name)")


def load_text(data: Any, *, split: str = "test", config_name: str | None = None, text_column: str = "text") -> str:
    """The text behind ``data``: a path to a file or folder, a ``datasets`` object, or a dataset name."""
    # A datasets object exists only once its module is imported: plain text files need no datasets.
    loaded = sys.modules.get("datasets")
    if loaded is not None and isinstance(data, (loaded.Dataset, loaded.DatasetDict)):
        return _join_rows(_pick_split(data, split), text_column)
    if not isinstance(data, (str, os.PathLike)):
        raise DataError(f"expected a text file, a folder of .txt files or a dataset, got {type(data).__name__}")
    check_text_source(data)
    path = Path(data).expanduser()
    if path.is_file():
        return _read_utf8(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            return _join_rows(_pick_split(datasets.load_from_disk(os.fspath(path)), split), text_column)
        files = sorted(path.glob("*.txt"))
        if files:
            return SEPARATOR.join(_read_utf8(f) for f in files)
    name = os.fspath(data)
    if name in DATASET_ALIASES:
        name, config_name, split = DATASET_ALIASES[name]
    return _load_dataset(name, split, config_name, text_column)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}); "
                        "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out") from None


def _load_dataset(name: str, split: str, config_name: str | None, text_column: str) -> str:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot get this data"
        raise DataError(
            f"{name!r} is not a text file, a folder of .txt files, nor a dataset that could be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); offline, pass a local "
            "file or folder"
        ) from None
    return _join_rows(dataset, text_column)


def tokenize(tokenizer, data: Any, **text_kwargs) -> torch.Tensor:
    """1-D token ids of ``data`` (already ids, or text loaded by :func:`hfcompress.data.load_text`)."""
    if isinstance(data, torch.Tensor):
        return data.flatten().long()
    if tokenizer is None:
        raise DataError("a tokenizer is needed to read text and none came with the model: save one beside it "
                        "(tokenizer.save_pretrained(folder)), or pass token ids")
    text = load_text(data, **text_kwargs)
    # The text is tokenized whole, as in the GPTQ protocol: mark the "longer than the model's maximum
    # length" warning as already given, since windows are cut afterwards.
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer(text, return_tensors="pt").input_ids[0]
