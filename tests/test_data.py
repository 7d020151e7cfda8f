"""Text sources: files, folders, datasets objects, saved datasets and dataset names."""

import subprocess
import sys

import datasets
import pytest

from hfcompress.data import bundled_text, load_text
from hfcompress.errors import DataError


def test_file_is_read_in_text_mode(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    assert load_text(tmp_path / "a.txt") == "line one\nline two\n"  # universal newlines, like the GPTQ code


def test_folder_of_txt_files_is_joined_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("not text data")
    assert load_text(tmp_path) == "first\n\nsecond"


def test_text_files_need_no_datasets_package(tmp_path):
    """A plain file or folder reads without importing datasets (an optional, slow import that a
    lean environment, such as a GPU machine's image, may lack)."""
    (tmp_path / "a.txt").write_text("some text")
    code = ("import sys; sys.modules['datasets'] = None\n"  # any import of datasets now fails
            "from hfcompress.data import load_text\n"
            f"assert load_text({str(tmp_path / 'a.txt')!r}) == 'some text'\n"
            f"assert load_text({str(tmp_path)!r}) == 'some text'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_datasets_objects_and_saved_datasets(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["one", "", "two"], "other": [1, 2, 3]})
    assert load_text(ds) == "one\n\ntwo"
    datasets.DatasetDict({"test": ds}).save_to_disk(tmp_path / "saved")
    assert load_text(tmp_path / "saved", split="test") == "one\n\ntwo"
    with pytest.raises(DataError, match="no split 'train'; its splits are test"):
        load_text(tmp_path / "saved", split="train")
    with pytest.raises(DataError, match="no column 'body'; its columns are text, other"):
        load_text(ds, text_column="body")


def test_dataset_name_through_load_dataset(tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    assert load_text(str(folder)) == "alpha\n\nbeta"  # a local packaged dataset; test.jsonl is its test split


def test_unknown_name_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="nor a dataset that could be loaded.*offline, pass a local file or folder"):
        load_text("nobody/no-such-dataset")


def test_bundled_texts_are_shipped():
    assert len(load_text(bundled_text("calibration"))) > 100_000
    assert len(load_text(bundled_text("evaluation"))) > 40_000
