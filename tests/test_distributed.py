"""GPTQ calibration over two processes (gloo on the CPU, as ``torchrun`` / ``accelerate launch``
start them) gives the single process's output."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from hfcompress.cli import main
from hfcompress import distributed

GPTQ = {"method": "gptq", "bits": 4, "group_size": 32, "sym": True, "act_order": True, "static_groups": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    try:
        code = main(argv)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if code != 0:
        raise SystemExit(code)


def _run(tmp_path, source, quantize: dict, extra: list[str] = (), before: list[dict] = ()) -> tuple[dict, dict]:
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"calibration": {"samples": 6, "seq_len": 128},
                                  "stages": [*before, {"quantize": quantize}]}))
    text = tmp_path / "calibration.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife. " * 40)
    common = [str(source), "--recipe", str(recipe), "--no-eval", "--dtype", "float32", "--calibration-data", str(text),
              *extra]
    assert main(["compress", *common, "--output", str(tmp_path / "one" / "out")]) == 0
    mp.spawn(_worker, args=(2, _free_port(), ["compress", *common, "--output", str(tmp_path / "two" / "out")]),
             nprocs=2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["out"]  # rank 1 wrote nothing of its own
    return (load_file(tmp_path / "one" / "out" / "model.safetensors"),
            load_file(tmp_path / "two" / "out" / "model.safetensors"))


@pytest.mark.parametrize("extra", [[], ["--layerwise"]])
def test_two_processes_give_the_single_process_output(tmp_path, tiny_llama_dir, extra):
    one, two = _run(tmp_path, tiny_llama_dir, GPTQ, extra)
    assert one.keys() == two.keys()
    # The Hessians are summed in another order (each process's mean, then the weighted sum), so
    # only float rounding separates them: the codes and scales agree.
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("extra", [[], ["--layerwise"]])
def test_two_processes_prune_as_one(tmp_path, tiny_llama_dir, extra):
    """Activation importance: each process scores its windows, the sums are added over processes."""
    prune = {"prune": {"heads": 3, "ffn": 0.25, "hidden": 0.25, "importance": "activation"}}
    one, two = _run(tmp_path, tiny_llama_dir, GPTQ, extra, before=[prune])
    assert one.keys() == two.keys()
    assert one["model.embed_tokens.weight"].shape[1] == 72  # 96 hidden channels, a quarter cut
    for name in one:
        assert torch.equal(one[name], two[name]), name


def test_two_processes_asymmetric_stays_close(tmp_path, tiny_llama_dir):
    one, two = _run(tmp_path, tiny_llama_dir, {**GPTQ, "asymmetric": 0.25})
    packed = [name for name in one if name.endswith("weight_packed") and name.startswith("model.layers.0.")]
    # The target W C H^-1 moves continuously with the summation order of C and H, so scales differ
    # in their last bits and a code near a rounding boundary may flip (measured: 0.5% at most in
    # the first layer). Later layers of this tiny model on its repetitive text amplify such flips
    # chaotically: ulp-level changes of the Hessian's arithmetic alone flip 10-20% of layer 1's
    # packed words in one process, so only the first layer's codes are compared.
    flips = sum(int((one[n] != two[n]).sum()) for n in packed) / sum(one[n].numel() for n in packed)
    assert flips < 0.01
    for name in one:
        if name.endswith("weight_scale"):
            assert torch.allclose(one[name].float(), two[name].float(), rtol=1e-2), name


def test_windows_are_split_by_rank(monkeypatch):
    windows = torch.arange(10).view(5, 2)
    assert torch.equal(distributed.local_windows(windows), windows)  # one process: all of them
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.local_windows(windows)[:, 0].tolist() == [2, 6]
    monkeypatch.setattr(distributed, "world", lambda: 6)
    with pytest.raises(ValueError, match="at least one window per process"):
        distributed.local_windows(windows)


def test_activation_importance_scores_its_share_and_adds_up(monkeypatch):
    """Rank 0 of 2 scores every other window; adding the other rank's sums (here: the same windows
    again) gives the single process's scores over all of them."""
    from conftest import tiny_llama
    from hfcompress.pruning.importance import activation_scores
    from hfcompress.pruning.layout import layout_of

    model = tiny_llama()
    layout = layout_of(model, mlp=True)
    window = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    one = activation_scores(model, layout, torch.cat([window, window]), hidden=True)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda t: 2 * t)  # the other rank saw the same window
    two = activation_scores(model, layout, torch.cat([window, window]), hidden=True)
    for a, b in zip(one.heads + one.ffn + [one.hidden, one.layers], two.heads + two.ffn + [two.hidden, two.layers]):
        assert torch.allclose(a, b, rtol=1e-5)
