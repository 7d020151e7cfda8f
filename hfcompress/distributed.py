"""Calibration spread over processes with ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Under ``torchrun`` or ``accelerate launch`` every process holds the model and runs its share of
the calibration windows (window ``i`` goes to rank ``i % world``) through each block. The
statistics a solver needs are means over tokens, so each is summed over the processes weighted
by its token count (:func:`mean_over_ranks`); the block's layer groups are then solved by
different ranks in turn (:func:`owner`) and their results sent to every rank
(:func:`share_from`), so that all processes continue with the same quantized block and rank 0
alone writes the output. With one process (or none initialized) every function here is the
identity, so single-process runs are untouched, bit for bit.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def active() -> bool:
    """Whether this process is one of several in an initialized process group."""
    return _initialized() and world() > 1


def world() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_environment(device: str | torch.device | None = None) -> bool:
    """Join the process group a launcher (``torchrun``, ``accelerate launch``) describes in the
    environment (``WORLD_SIZE`` > 1); gloo for the CPU, NCCL for CUDA. Returns whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        logger.info("process %d of %d (%s)", rank(), world(), "nccl" if cuda else "gloo")
    return True


def local_windows(windows: torch.Tensor) -> torch.Tensor:
    """This process's share of the calibration windows (every ``world``-th, from its rank)."""
    if not active():
        return windows
    if len(windows) < world():
        raise ValueError(f"{len(windows)} calibration windows for {world()} processes: give at least one window "
                         "per process (calibration.samples)")
    return windows[rank()::world()]


def mean_over_ranks(mean: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """A mean over this process's ``count`` tokens -> the mean over every process's tokens."""
    if not active():
        return mean, count
    total = torch.tensor([float(count)], dtype=torch.float64, device=mean.device)
    torch.distributed.all_reduce(total)
    weighted = mean * count
    torch.distributed.all_reduce(weighted)
    n = int(total.item())
    return (weighted / n if n else weighted), n


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every process (itself when there is one)."""
    if not active():
        return value
    total = value.clone()
    torch.distributed.all_reduce(total)
    return total


def gathered(value) -> list:
    """``value`` of every process, by rank (small picklable values: names, counts)."""
    if not active():
        return [value]
    values: list = [None] * world()
    torch.distributed.all_gather_object(values, value)
    return values


def union_of(items: list) -> list:
    """Every process's ``items`` (names), in first-seen order over the ranks: the same list on all."""
    seen: dict = {}
    for part in gathered(list(items)):
        for item in part:
            seen.setdefault(item, None)
    return list(seen)


def owner(index: int) -> int:
    """The rank that solves the ``index``-th layer group of a block (round robin)."""
    return index % world()


def share_from(source: int, value):
    """``value`` as rank ``source`` has it, on every rank (the others pass anything)."""
    if not active():
        return value
    box = [value if rank() == source else None]
    torch.distributed.broadcast_object_list(box, src=source)
    return box[0]


def barrier() -> None:
    if active():
        torch.distributed.barrier()
