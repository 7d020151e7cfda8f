"""What each quantization option of each linear layer costs the model, measured once and cached.

For every target linear layer ``m`` (the quantize stage's targets) and every option ``o`` (a bit
width and group size the kernels take), the layer alone is quantized as the stage would quantize
it (GPTQ with the Hessian of its own calibration inputs, or RTN), which changes its weight by
``D = Q - W``. The cost of that change is estimated as the increase of the model's mean
next-token loss (nats per token), to second order with the Fisher information in its
Kronecker-factored form (K-FAC; Martens and Grosse, 2015):

    cost(m, o) = 1/2 tr(G D A D^T),   A = E[x x^T],   G = E[g g^T]

where ``x`` are the layer's inputs and ``g`` the gradients of the summed next-token loss with
respect to its outputs, both averaged over calibration tokens. ``A`` is GPTQ's Hessian (halved)
and ``G`` comes from one backward pass per calibration window, so measuring every option of every
layer costs one forward and backward pass over the windows plus the quantizations themselves.
The layer's own relative output error ``tr(D H D^T) / tr(W H W^T)`` (what GPTQ minimizes, blind
to what comes after the layer) is kept beside it; ``benchmarks/plan_vs_uniform.py`` compares
both, and the KL divergence of the logits measured with each layer quantized alone, against
measured perplexity (the correlations are in ``benchmarks/README.md``).

Costs of different layers add up (to second order, and ignoring their interactions), which is
what lets :mod:`hfcompress.planning.planner` choose each layer's option separately.

The result is a :class:`Sensitivity` saved as one safetensors file (the matrices as tensors, the
module names, options and settings in its metadata).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..models import linear_shape, linear_weight
from ..quantization.gptq import accumulate_hessian, gptq_quantize, relative_error
from ..quantization.qlinear import LinearFormat, QuantLinear
from ..quantization.rtn import quantize_rtn
from ..pruning.importance import Scores
from ..recipe import QuantizeStage
from .pruning import PRUNE_KINDS, PruneCosts, PruneMeasure, measure_prune_costs

logger = logging.getLogger(__name__)

# Bit widths and group sizes every kernel takes (Triton: groups in multiples of 16; the CPU int4
# kernel: groups of 32 to 256); the planner chooses among these.
DEFAULT_OPTIONS = ((2, 64), (2, 128), (3, 64), (3, 128), (4, 64), (4, 128), (8, 64), (8, 128))
FORMAT_VERSION = "1"


class SensitivityError(UserError):
    """A sensitivity file that does not fit the model or the request."""


@dataclass
class Sensitivity:
    """Costs and sizes of every option of every layer (rows: ``modules``, columns: ``options``)."""

    modules: list[str]
    options: list[tuple[int, int]]  # (bits, group_size)
    cost: torch.Tensor  # [M, O] predicted increase of the mean next-token loss, nats per token
    output_error: torch.Tensor  # [M, O] the layer's relative output error on the calibration inputs
    nbytes: torch.Tensor  # [M, O] int64: bytes the layer takes stored in that format
    weights: torch.Tensor  # [M] int64: weights of each layer
    float_nbytes: torch.Tensor  # [M] int64: bytes of each layer's float weight as the model holds it
    loss: float  # the unquantized model's mean next-token loss on the calibration windows
    settings: dict = field(default_factory=dict)  # what it was measured with (method, windows, ...)
    prune: PruneMeasure | None = None  # the cuts' costs, when measured (:mod:`.pruning`)

    def option_index(self, bits: int, group_size: int) -> int:
        try:
            return self.options.index((bits, group_size))
        except ValueError:
            raise SensitivityError(f"no option of {bits} bits, group size {group_size} was measured; measured: "
                                   + ", ".join(f"{b}-bit g{g}" for b, g in self.options)) from None

    def linear_format(self, bits: int, group_size: int) -> LinearFormat:
        """How a layer is stored in option ``(bits, group_size)`` under the measured settings."""
        gptq = self.settings.get("gptq", {})
        act_order = self.settings.get("method") == "gptq" and gptq.get("act_order", False) and not gptq.get("static_groups")
        return LinearFormat(bits=bits, group_size=group_size, sym=self.settings.get("sym", True), act_order=act_order)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        metadata = {"format_version": FORMAT_VERSION, "modules": json.dumps(self.modules),
                    "options": json.dumps(self.options), "loss": repr(self.loss), "settings": json.dumps(self.settings)}
        tensors = {"cost": self.cost, "output_error": self.output_error, "nbytes": self.nbytes,
                   "weights": self.weights, "float_nbytes": self.float_nbytes}
        if self.prune is not None:
            metadata["prune"] = json.dumps({"head_dim": self.prune.head_dim,
                                            **{k: c.metadata() for k, c in self.prune.costs.items()}})
            for kind, costs in self.prune.costs.items():
                tensors[f"prune.{kind}.cost"], tensors[f"prune.{kind}.kept"] = costs.cost, costs.kept
            tensors.update({f"scores.{k}": v for k, v in self.prune.scores.to_tensors().items()})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, staging, metadata=metadata)
        staging.replace(path)  # never half a file under the final name

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise SensitivityError(f"{path}: not a readable sensitivity file ({str(err)[:120]}); measure it again "
                                   "(hfcompress plan --sensitivity-only)") from None
        if metadata.get("format_version") != FORMAT_VERSION or "cost" not in tensors:
            raise SensitivityError(f"{path}: not a sensitivity file of this version; measure it again")
        prune = None
        if "prune" in metadata:
            saved = json.loads(metadata["prune"])
            scores = Scores.from_tensors("activation", {k[len("scores."):]: v for k, v in tensors.items()
                                                        if k.startswith("scores.")})
            prune = PruneMeasure({kind: PruneCosts.from_saved(kind, saved[kind], tensors) for kind in PRUNE_KINDS
                                  if kind in saved}, scores, saved["head_dim"])
        return cls(json.loads(metadata["modules"]), [tuple(o) for o in json.loads(metadata["options"])],
                   tensors["cost"], tensors["output_error"], tensors["nbytes"], tensors["weights"],
                   tensors["float_nbytes"], float(metadata["loss"]), json.loads(metadata.get("settings", "{}")), prune)


def stored_nbytes(in_features: int, out_features: int, fmt: LinearFormat, bias: bool = False) -> int:
    """Bytes of a :class:`QuantLinear` of this shape and format as saved (packed codes, zero
    points, scales, act-order indices, bias)."""
    module = QuantLinear(in_features, out_features, fmt, bias=bias, device="meta")
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class _Statistics:
    """Per-layer ``H`` (GPTQ's, from the inputs) and ``G`` (from the output gradients) over windows."""

    def __init__(self, targets: dict[str, nn.Module]):
        self.targets = targets
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.share: dict[str, str] = {}  # layer -> the layer whose identical input it reads
        self.gradients: dict[str, torch.Tensor] = {}
        self.gradient_tokens: dict[str, int] = {}
        self._last: tuple[torch.Tensor, str] | None = None

    def forward_hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach()
            if self._last is not None and self._last[0] is args[0]:
                self.share[name] = self._last[1]  # q/k/v, gate/up: one Hessian for all of them
            else:
                self._last = (args[0], name)
                H = self.hessians.get(name)
                if H is None:
                    H = torch.zeros(x.shape[-1], x.shape[-1])
                self.hessians[name], self.counts[name] = accumulate_hessian(H, x, self.counts.get(name, 0))
            if output.requires_grad:
                output.register_hook(lambda g: self._gradient(name, g))
        return hook

    def _gradient(self, name: str, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.shape[-1]).float()
        G = self.gradients.get(name)
        if G is None:
            G = self.gradients[name] = torch.zeros(g.shape[-1], g.shape[-1])
        G.addmm_(g.t(), g)
        self.gradient_tokens[name] = self.gradient_tokens.get(name, 0) + g.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        return self.hessians[self.share.get(name, name)]

    def gradient(self, name: str) -> torch.Tensor:
        """``E[g g^T]`` of the layer's outputs, per calibration token."""
        return self.gradients[name] / max(self.gradient_tokens.get(name, 0), 1)


def _collect(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor) -> tuple[_Statistics, float]:
    """One forward and backward pass per window: every layer's ``H`` and ``G``; the mean loss."""
    stats = _Statistics(targets)
    handles = [module.register_forward_hook(stats.forward_hook(name)) for name, module in targets.items()]
    embed = model.get_input_embeddings()
    # Gradients flow to the activations only: the embedding output starts the graph.
    handles.append(embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True)))
    device = next(p for p in model.parameters() if not p.is_meta).device
    requires = {p: p.requires_grad for p in model.parameters()}
    total, tokens = 0.0, 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for window in tqdm(windows, desc="sensitivity: gradients", unit="window"):
            ids = window[None].to(device)
            stats._last = None
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits.float()
                loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")  # g of the summed loss
                loss.backward()
            total += float(loss)
            tokens += ids.shape[1] - 1
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
    missing = [name for name in targets if name not in stats.gradients]
    if missing:
        raise SensitivityError(f"{len(missing)} layers received no gradient (e.g. {missing[0]}): the calibration "
                               "forward pass does not reach them")
    return stats, total / max(tokens, 1)


def _quantized_change(W: torch.Tensor, H: torch.Tensor, stage: QuantizeStage, bits: int,
                      group_size: int) -> torch.Tensor:
    """``Q - W`` for ``W`` quantized alone to ``bits``/``group_size`` as the stage would."""
    if stage.method == "gptq":
        result = gptq_quantize(W, H, bits, group_size, stage.sym, damp=stage.damp, block_size=stage.block_size,
                               act_order=stage.act_order, static_groups=stage.static_groups, mse=stage.mse,
                               shrink=stage.shrink, measure=False)
        return result.weight.dequantize() - W
    return quantize_rtn(W, bits, group_size, stage.sym).dequantize() - W


@torch.no_grad()
def measure_sensitivity(model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor,
                        stage: QuantizeStage, options=DEFAULT_OPTIONS, prune: tuple[str, ...] = ()) -> Sensitivity:
    """Cost and size of each of ``options`` for each of ``targets`` (see the module doc);
    ``stage`` says how a layer is quantized (method, symmetry and GPTQ's settings); ``prune``:
    the kinds of cuts (``heads``, ``ffn``) priced too (:mod:`.pruning`)."""
    options = [tuple(o) for o in options]
    for bits, group_size in options:
        LinearFormat(bits=bits, group_size=group_size, sym=stage.sym)  # a clear error for an invalid option
    stats, loss = _collect(model, targets, windows)
    names = list(targets)
    row = {name: i for i, name in enumerate(names)}
    cost = torch.zeros(len(names), len(options))
    error = torch.zeros(len(names), len(options))
    nbytes = torch.zeros(len(names), len(options), dtype=torch.int64)
    weights = torch.zeros(len(names), dtype=torch.int64)
    float_nbytes = torch.zeros(len(names), dtype=torch.int64)
    # Layers reading the same input share H and are quantized as one stacked matrix (rows are
    # quantized independently, so each gets its own result), as the GPTQ stage does.
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(stats.share.get(name, name), []).append(name)
    progress = tqdm(total=len(names) * len(options), desc="sensitivity: options", unit="option")
    for leader, members in groups.items():
        H = stats.hessian(leader)
        A = H / 2  # accumulate_hessian's H is 2 E[x x^T]
        parts = [linear_weight(targets[name]).detach().float() for name in members]
        W = torch.cat(parts) if len(parts) > 1 else parts[0]
        for name, part in zip(members, parts):
            weights[row[name]] = part.numel()
            stored = linear_weight(targets[name])
            float_nbytes[row[name]] = stored.numel() * stored.element_size()
        for j, (bits, group_size) in enumerate(options):
            changes = _quantized_change(W, H, stage, bits, group_size).split([p.shape[0] for p in parts])
            fmt = LinearFormat(bits=bits, group_size=group_size, sym=stage.sym,
                               act_order=stage.method == "gptq" and stage.act_order and not stage.static_groups)
            for name, part, D in zip(members, parts, changes):
                i = row[name]
                G = stats.gradient(name)
                cost[i, j] = 0.5 * float(torch.sum((G @ D) * (D @ A)))  # tr(G D A D^T), both symmetric
                error[i, j] = relative_error(part, part + D, H)
                in_features, out_features = linear_shape(targets[name])
                nbytes[i, j] = stored_nbytes(in_features, out_features, fmt,
                                             getattr(targets[name], "bias", None) is not None)
                progress.update(1)
    progress.close()
    cuts = measure_prune_costs(model, targets, windows, stats, tuple(prune)) if prune else None
    settings = sensitivity_settings(stage, windows, options, prune)
    logger.info("sensitivity of %d layers x %d options measured on %d tokens (float loss %.4f)", len(names),
                len(options), windows.numel(), loss)
    return Sensitivity(names, options, cost, error, nbytes, weights, float_nbytes, loss, settings, cuts)


@torch.no_grad()
def with_prune_costs(sensitivity: Sensitivity, model: nn.Module, targets: dict[str, nn.Module], windows: torch.Tensor,
                     prune: tuple[str, ...]) -> Sensitivity:
    """``sensitivity`` (measured on ``windows``) with the costs of the ``prune`` cuts added: one
    forward and backward pass for the statistics, none of the quantizations again."""
    import dataclasses

    stats, _ = _collect(model, targets, windows)
    settings = {k: v for k, v in sensitivity.settings.items() if k != "prune"}
    if prune:
        settings["prune"] = sorted(prune)
    cuts = measure_prune_costs(model, targets, windows, stats, tuple(prune)) if prune else None
    return dataclasses.replace(sensitivity, settings=settings, prune=cuts)


def sensitivity_settings(stage: QuantizeStage, windows: torch.Tensor, options=DEFAULT_OPTIONS,
                         prune: tuple[str, ...] = ()) -> dict:
    """What a sensitivity was measured with: a cached one is used only when these match."""
    import hashlib

    settings = {"method": stage.method, "sym": stage.sym, "gptq": {k: getattr(stage, k) for k in QuantizeStage.GPTQ_KEYS},
                "options": [list(o) for o in options], "windows": list(windows.shape),
                "windows_sha256": hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()[:16]}
    if prune:
        settings["prune"] = sorted(prune)
    return settings


def predicted_perplexity_ratio(total_cost: float) -> float:
    """Perplexity of the quantized model over the float model's, from the summed cost (nats/token)."""
    return math.exp(total_cost)
