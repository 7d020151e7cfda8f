"""The piecewise safetensors writer: the same bytes as safetensors' own save, whatever the order of writes."""

import random

import pytest
import torch
from safetensors.torch import save_file

from hfcompress.formats.checkpoint import sort_metadata_in_place
from hfcompress.formats.stream_writer import StreamWriter

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def random_tensors(rnd: random.Random) -> dict:
    tensors = {}
    for _ in range(rnd.randint(0, 12)):
        name = rnd.choice(["model.", "lm_head.", "a", "z.", "ü"]) + str(rnd.randint(0, 50)) + rnd.choice(
            [".weight", ".qweight", ""])
        dtype = rnd.choice(DTYPES)
        shape = tuple(rnd.randint(0, 5) for _ in range(rnd.randint(0, 3)))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(rnd.randint(0, 999))) * 10
        tensors[name] = values > 0 if dtype == torch.bool else values.to(dtype)
    return tensors


@pytest.mark.parametrize("seed", range(40))
def test_same_bytes_as_safetensors_in_any_write_order(tmp_path, seed):
    rnd = random.Random(seed)
    tensors = random_tensors(rnd)
    metadata = rnd.choice([None, {"format": "pt"}, {"format": "pt", "b": "x", "a": "y"}])
    save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
    sort_metadata_in_place(tmp_path / "reference.safetensors")  # what every save of ours does after writing
    with StreamWriter(tmp_path / "streamed.safetensors", {k: (v.dtype, v.shape) for k, v in tensors.items()},
                      metadata) as writer:
        for name in rnd.sample(list(tensors), len(tensors)):
            writer.write(name, tensors[name])
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_a_tensor_never_written_or_not_as_declared_is_an_error(tmp_path):
    entries = {"a": (torch.float32, (2,)), "b": (torch.int32, (3,))}
    writer = StreamWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ValueError, match=r"b: declared torch.int32 \[3\], got torch.int32 \[2\]"):
        writer.write("b", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(KeyError, match="c was not declared"):
        writer.write("c", torch.zeros(1))
    writer.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="1 declared tensor was never written"):
        writer.close()


def test_shard_plan_is_huggingface_hubs_split_in_name_order():
    import random

    from huggingface_hub import split_torch_state_dict_into_shards

    from hfcompress.formats.shards import plan_shards

    rng = random.Random(0)
    for case in range(30):
        entries = {f"t{rng.randrange(10 ** 6)}.w": (torch.float32, (rng.randrange(1, 300),)) for _ in range(rng.randrange(1, 20))}
        limit = rng.choice([64, 400, 1000, 10 ** 6])
        ours = plan_shards(entries, limit)
        state = {name: torch.zeros(entries[name][1]) for name in sorted(entries)}
        split = split_torch_state_dict_into_shards(state, max_shard_size=limit)
        assert ours == {file: list(names) for file, names in split.filename_to_tensors.items()}, case


def test_write_folder_streams_refs_and_derived_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from hfcompress.formats.shards import Derived, Part, file_refs, write_folder

    save_file({"a": torch.arange(6.0), "b": torch.ones(2, 2, dtype=torch.bfloat16)}, tmp_path / "src.safetensors")
    refs = file_refs([tmp_path / "src.safetensors"], dtype_of=lambda name, stored: torch.float32)
    calls = []

    def compute():
        calls.append(1)
        return {"c": torch.full((3,), 7, dtype=torch.int32), "d": torch.zeros(1)}

    derived = Derived(compute)
    out = tmp_path / "out"
    out.mkdir()
    plan = write_folder(out, {"a": refs["a"], "b": refs["b"], "c": Part(derived, "c"), "d": Part(derived, "d"),
                              "e": torch.ones(2)}, max_shard_size=30)
    assert len(plan) > 1 and (out / "model.safetensors.index.json").is_file()
    loaded = {}
    for file in plan:
        loaded.update(load_file(out / file))
    assert torch.equal(loaded["a"], torch.arange(6.0)) and loaded["b"].dtype == torch.float32
    assert loaded["c"].tolist() == [7, 7, 7] and torch.equal(loaded["e"], torch.ones(2))
    assert len(calls) == 2  # once for the plan's shapes, once to write both outputs
