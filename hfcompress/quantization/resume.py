"""Checkpoints of a layer-by-layer run, so that an interrupted run continues where it stopped.

After each finished block the runner saves the block's packed modules and the hidden states that
feed the next block; ``state.json`` is written last (each file is written beside its final name
and renamed), so the folder always describes a consistent point. A fingerprint of the model, the
stage and the calibration windows guards against resuming with other arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .qlinear import LinearFormat, QuantLinear

logger = logging.getLogger(__name__)

HIDDEN = re.compile(r"hidden_\d{4}\.safetensors")  # the only file names state.json may hold


def fingerprint(*parts) -> str:
    """A stable hash of JSON-able parts and tensors."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            # numpy has no bfloat16: hash the raw bytes, with dtype and shape so views differ.
            raw = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
            digest.update(raw.numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, partial)
    os.replace(partial, path)


class ResumeState:
    """The checkpoint folder of one run (identified by ``key``)."""

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder = Path(folder)
        self.key = key

    @property
    def _state_file(self) -> Path:
        return self.folder / "state.json"

    def _corrupt(self, why: str) -> UserError:
        return UserError(f"{self.folder.parent} is corrupt ({why}): delete {self.folder.parent} to start over, or "
                         "rerun with the output of the run that wrote it")

    def _read_state(self) -> dict:
        """``state.json``, checked: every block it counts saved beside it, every name one of ours."""
        try:
            state = json.loads(self._state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self._corrupt(f"state.json unreadable: {str(err)[:120]}") from None
        shape = {"key": str, "blocks_done": int, "blocks": dict, "modules": dict, "in_features": dict}
        if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in shape.items()):
            raise self._corrupt("state.json lacks its fields")
        if state.get("key") != self.key:
            raise UserError(
                f"{self.folder} holds the state of a run with other arguments (model, recipe or calibration "
                "data differ): delete it to start over"
            )
        done, hidden = state["blocks_done"], state.get("hidden")
        if hidden is not None and not (isinstance(hidden, str) and HIDDEN.fullmatch(hidden)):
            raise self._corrupt(f"state.json names {hidden!r:.60} as hidden states")
        for block in range(done):
            if not (self.folder / f"block_{block:04d}.safetensors").is_file() or str(block) not in state["blocks"]:
                raise self._corrupt(f"state.json counts {done} finished blocks, block {block} is missing")
        if hidden and not (self.folder / hidden).is_file():
            raise self._corrupt(f"{hidden} is missing")
        return state

    def done(self) -> int:
        """How many blocks a previous run finished (0 when there is nothing to resume)."""
        if not self._state_file.exists():
            return 0
        return self._read_state()["blocks_done"]

    def restore(self, model: torch.nn.Module, hidden: torch.Tensor | None = None) -> dict[str, LinearFormat]:
        """Put the finished blocks' packed modules into ``model`` and the saved hidden states into
        ``hidden`` (a chained walk; a replayed one recomputes them)."""
        state = self._read_state()
        restored = {}
        try:
            for block in range(state["blocks_done"]):
                tensors = load_file(self.folder / f"block_{block:04d}.safetensors")
                for name in state["blocks"][str(block)]:
                    fmt = LinearFormat(**state["modules"][name])
                    own = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
                    module = QuantLinear(state["in_features"][name], own["qweight"].shape[1], fmt, bias="bias" in own)
                    module.load_state_dict(own, strict=True, assign=True)  # keep the saved dtypes
                    model.set_submodule(name, module)
                    restored[name] = fmt
            if hidden is not None and state["hidden"]:
                hidden.copy_(load_file(self.folder / state["hidden"])["hidden"])
        except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise self._corrupt(f"{type(err).__name__}: {str(err)[:160]}") from None
        logger.info("resumed from %s: %d blocks already done", self.folder, state["blocks_done"])
        return restored

    def save(self, block: int, modules: dict[str, QuantLinear], hidden: torch.Tensor | None) -> None:
        """Record that ``block`` is finished, with its packed modules and the next block's inputs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = json.loads(self._state_file.read_text()) if self._state_file.exists() else {
            "key": self.key, "blocks_done": 0, "blocks": {}, "modules": {}, "in_features": {}, "hidden": None}
        tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
        _atomic_save(tensors, self.folder / f"block_{block:04d}.safetensors")
        previous_hidden = state["hidden"]
        state["hidden"] = f"hidden_{block:04d}.safetensors" if hidden is not None else None
        if hidden is not None:
            _atomic_save({"hidden": hidden}, self.folder / state["hidden"])
        state["blocks"][str(block)] = list(modules)
        state["modules"].update({name: m.format.to_dict() for name, m in modules.items()})
        state["in_features"].update({name: m.in_features for name, m in modules.items()})
        state["blocks_done"] = block + 1
        partial = self._state_file.with_name("state.json.partial")
        partial.write_text(json.dumps(state))
        os.replace(partial, self._state_file)  # the commit point
        if previous_hidden:
            (self.folder / previous_hidden).unlink(missing_ok=True)


def resume_state(model: torch.nn.Module, stage, windows: torch.Tensor, context) -> ResumeState | None:
    """The checkpoint folder of this GPTQ stage (None without ``context.resume_dir``), keyed by the
    model, the stage, its place in the recipe, the compute dtype and the calibration windows."""
    if context.resume_dir is None:
        return None
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("quantization_config", "transformers_version", "_name_or_path")}
    key = fingerprint(config, stage.to_dict(), context.stage_index, f"{model.dtype} {context.compute_dtype(model)}",
                      windows, model.get_input_embeddings().weight)
    return ResumeState(Path(context.resume_dir) / f"stage{context.stage_index}", key)
