"""AWQ's lifecycle: which linears share an input and where their scales fold, block by block.

The maths is in ``awq.py``. Per decoder block, the groups are:

- the linears that read a norm's output (q/k/v after the attention norm, gate/up after the MLP
  norm; found with :func:`hfcompress.models.stream.map_stream`): ``1/s`` folds into the norm's scale;
- the output projection after the values, when each value channel feeds exactly one of its
  input channels (no grouped-query sharing): ``1/s`` folds into the value rows;
- the MLP's down projection after the up projection (``down(act(gate) * up)`` is linear in
  ``up``'s output): ``1/s`` folds into the up rows.

All inputs of a block are sampled in one pass before any scale moves (each fold keeps the float
function, so the sampled inputs stay valid up to that factor, which the search accounts for),
then the walk runs the calibration windows through the scaled block to feed the next one. The
model stays float; the quantize stage rounds it afterwards (RTN or GPTQ).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import input_hooks, run_block, walk_blocks
from ..residency import home_device
from ..models import block_names, decoder_blocks, linear_shape
from ..models.layout import block_layout
from ..models.stream import map_stream, norm_scale
from ..recipe import QuantizeStage
from .awq import search_scales
from .grid import fake_quantize

logger = logging.getLogger(__name__)

UP_NAMES = {"up_proj", "w3", "c_fc2", "fc_in2"}  # the linear (not gated) half of a gated MLP


@dataclass(frozen=True)
class ScaleGroup:
    source: str  # the module whose output the readers take: a norm, or a linear
    readers: tuple[str, ...]
    norm: bool  # the source is a norm (else a linear whose rows take 1/s)


def scale_groups(model: nn.Module) -> dict[int, list[ScaleGroup]]:
    """The groups of each decoder block (by index)."""
    stream = map_stream(model)
    groups: dict[int, list[ScaleGroup]] = {}
    for b, (block, prefix) in enumerate(zip(decoder_blocks(model), block_names(model))):
        found = [ScaleGroup(norm, tuple(readers), True) for norm, readers in stream.readers.items()
                 if norm.startswith(prefix + ".")]
        layout = block_layout(model, block)  # map_stream has refused blocks without one
        att, mlp = layout.attention, layout.mlp
        if att.v and linear_shape(block.get_submodule(att.v))[1] == linear_shape(block.get_submodule(att.out))[0]:
            found.append(ScaleGroup(f"{prefix}.{att.v}", (f"{prefix}.{att.out}",), False))
        up = [n for n in mlp.inputs if n.rsplit(".", 1)[-1] in UP_NAMES]
        if len(up) == 1 and len(mlp.inputs) == 2:
            found.append(ScaleGroup(f"{prefix}.{up[0]}", (f"{prefix}.{mlp.out}",), False))
        groups[b] = found
    return groups


@torch.no_grad()
def fold_scales(model: nn.Module, group: ScaleGroup, s: torch.Tensor) -> None:
    """``W <- W diag(s)`` for the readers, ``1/s`` into the source: the float function is unchanged."""
    source = model.get_submodule(group.source)
    s = s.to(source.weight.device)
    if group.norm:
        gamma, unit = norm_scale(source, s.numel())
        value = gamma.to(s) / s if unit == 1.0 else gamma.to(s) / s - 1  # Gemma's norms scale by 1 + w
        source.weight.copy_(value.to(source.weight.dtype))
    else:
        source.weight.div_(s[:, None].to(source.weight.dtype))
        if source.bias is not None:
            source.bias.div_(s.to(source.bias.dtype))
    for name in group.readers:
        reader = model.get_submodule(name)
        reader.weight.mul_(s[None, :].to(reader.weight.dtype))


@torch.no_grad()
def apply_awq_scales(model: nn.Module, stage: QuantizeStage, windows: torch.Tensor, device: torch.device | None = None,
                     compute_dtype: torch.dtype | None = None, tokens: int = 4096) -> None:
    """Search and fold the scales of every group, block by block, on ``tokens`` sampled inputs."""
    groups = scale_groups(model)
    stride = max(1, windows.numel() // tokens)

    def rounding(W: torch.Tensor) -> torch.Tensor:
        return fake_quantize(W, stage.bits, stage.group_size, stage.sym)

    blocks = decoder_blocks(model)
    run_device = device or home_device(model)  # where the walk computes
    for step in tqdm(walk_blocks(model, windows, device, compute_dtype), total=len(blocks), desc="AWQ scales",
                     unit="layer"):
        todo = groups.get(step.index, []) if step.reached else []
        if not todo:
            continue
        first = {group.readers[0]: model.get_submodule(group.readers[0]) for group in todo}
        samples: dict[str, list[torch.Tensor]] = {}

        def keep(name: str, x: torch.Tensor) -> None:
            samples.setdefault(name, []).append(x.reshape(-1, x.shape[-1])[::stride].float())

        with input_hooks(first, keep):
            run_block(step.block, step.inputs, run_device, dtype=compute_dtype)
        chosen = []
        for group in todo:
            x = torch.cat(samples[group.readers[0]])
            W = torch.cat([model.get_submodule(name).weight.float() for name in group.readers])
            s = search_scales(x.to(W.device), W, rounding)
            fold_scales(model, group, s)
            chosen.append(f"{group.readers[0].rsplit('.', 2)[-2]}.. {float(s.max() / s.min()):.1f}")
        logger.info("layer %d: AWQ scale spread (max/min) %s", step.index + 1, ", ".join(chosen))
