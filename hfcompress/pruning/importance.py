"""How much each head, FFN channel, hidden channel and layer matters, three ways.

- ``activation`` (Minitron, Muralidharan et al., 2024): from calibration windows run one block
  at a time (as the GPTQ runner does). A head scores the mean L2 norm of its output before the
  output projection; an FFN channel the mean absolute value of its intermediate (post-activation)
  feature; a hidden channel the mean absolute value of the normalization outputs, summed over
  the blocks' norms.
- ``magnitude``: weights only: the squared norm of what a unit owns (a head's query rows and
  output-projection columns, a key/value head's key and value rows, a channel's FFN rows and
  column, a hidden channel's embedding column).
- ``taylor`` (first order; Molchanov et al., 2019; LLM-Pruner): ``(sum of w * dL/dw)**2`` over a
  head's, key/value head's or channel's weights, the squared loss change that removing it
  predicts, from the gradients of the language-modelling loss on each calibration window,
  averaged over windows.

Layers always score by Block Influence (ShortGPT, Men et al., 2024): one minus the mean cosine
similarity between a block's input and output hidden states, measured on calibration windows;
a block that barely changes its input is the cheapest to drop.

All three measures are non-negative; a removable unit (a GQA group, say) scores the sum of its parts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..calibration import run_block, walk_blocks
from ..models import block_names, decoder_blocks, linear_weight, linear_weight_grad
from ..models.layout import head_rows
from ..residency import resident
from .layout import PruningError, PruningLayout

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """Per-layer importance: query heads ``[H]``, key/value heads ``[KV]`` (what a key/value head
    adds beyond its query heads), FFN channels ``[F]``; per-model hidden channels and layers."""

    method: str
    heads: list[torch.Tensor] = field(default_factory=list)
    kv_heads: list[torch.Tensor] = field(default_factory=list)
    ffn: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    layers: torch.Tensor | None = None

    def save(self, path) -> None:
        """Write the scores file a prune stage's ``scores:`` reads back (whole, or not at all)."""
        from pathlib import Path

        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".partial")
        save_file(self.to_tensors(), str(staging), metadata={"importance": self.method})
        staging.replace(path)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (h, kv, f) in enumerate(zip(self.heads, self.kv_heads, self.ffn)):
            out.update({f"{i}.heads": h, f"{i}.kv_heads": kv, f"{i}.ffn": f})
        if self.hidden is not None:
            out["hidden"] = self.hidden
        if self.layers is not None:
            out["layers"] = self.layers
        return {k: v.float().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, method: str, tensors: dict[str, torch.Tensor]) -> Scores:
        n = sum(1 for k in tensors if k.endswith(".heads"))
        return cls(method, [tensors[f"{i}.heads"] for i in range(n)], [tensors[f"{i}.kv_heads"] for i in range(n)],
                   [tensors[f"{i}.ffn"] for i in range(n)], tensors.get("hidden"), tensors.get("layers"))


def _norm_modules(layout: PruningLayout, block: nn.Module) -> list[nn.Module]:
    return [block.get_submodule(path) for path in layout.block.norms]


@torch.no_grad()
def activation_scores(model: nn.Module, layout: PruningLayout | None, windows: torch.Tensor,
                      device: torch.device | None = None, dtype: torch.dtype | None = None,
                      hidden: bool = False) -> Scores:
    """Activation importance and Block Influence, one block at a time on ``device`` (``layout``
    None: Block Influence only). Over several processes each runs its share of the windows and the
    sums are added up before they are normalized, so every process chooses the same cuts."""
    blocks = decoder_blocks(model)
    scores = Scores("activation")
    n_windows = len(windows)
    windows = distributed.local_windows(windows)
    influence = torch.zeros(len(blocks))
    sums: dict[str, list] = {"heads": [], "kv_heads": [], "ffn": [], "tokens": [], "hidden": []}
    state: dict = {}

    def observe(b, x, out):
        cos = torch.nn.functional.cosine_similarity(x.float(), out.float(), dim=-1)
        influence[b] += float(cos.mean())

    def head_hook(module, args):
        x = args[0].detach().float().reshape(-1, state["sizes"].heads, state["hd"])
        state["heads"] += x.norm(dim=-1).sum(0)
        state["tokens"] += x.shape[0]

    def ffn_hook(module, args):
        state["ffn"] += args[0].detach().float().reshape(-1, state["sizes"].ffn).abs().sum(0)

    def norm_hook(module, args, output):
        x = output.detach().float().reshape(-1, output.shape[-1]).abs().mean(0)
        state["hidden"] = x if state["hidden"] is None else state["hidden"] + x

    def collect(step):
        """After the walk's own pass through the block (which ran the hooks): the block's sums."""
        if layout is not None:
            sums["heads"].append(state["heads"].cpu())
            sums["kv_heads"].append(torch.zeros(state["sizes"].kv_heads))
            sums["ffn"].append(state["ffn"].cpu())
            sums["tokens"].append(torch.tensor([float(state["tokens"])]))
            if hidden:
                sums["hidden"].append(state["hidden"].cpu())
        progress.update(1)

    progress = tqdm(total=len(blocks), desc="importance (activation)", unit="layer")
    for step in walk_blocks(model, windows, device, dtype, observe=observe, after=collect):
        if layout is None or not step.reached:
            continue
        block = step.block
        sizes = layout.sizes(block)
        device_here = next(block.parameters()).device
        state.update(sizes=sizes, hd=layout.head_dim(), tokens=0, hidden=None,
                     heads=torch.zeros(sizes.heads, device=device_here), ffn=torch.zeros(sizes.ffn, device=device_here))
        handles = [block.get_submodule(layout.attention.out).register_forward_pre_hook(head_hook)]
        if layout.mlp is not None:
            handles.append(block.get_submodule(layout.mlp.out).register_forward_pre_hook(ffn_hook))
        if hidden:
            handles += [norm.register_forward_hook(norm_hook) for norm in _norm_modules(layout, block)]
        step.hooks += handles  # the walk's own pass through the block runs them
    progress.close()
    influence = distributed.sum_over_ranks(influence)
    # Key/value heads score zero here (no activation measure of their own): nothing to add up.
    sums = {key: values if key == "kv_heads" else [distributed.sum_over_ranks(t) for t in values]
            for key, values in sums.items()}
    for heads, kv_heads, ffn, tokens in zip(sums["heads"], sums["kv_heads"], sums["ffn"], sums["tokens"]):
        tokens = max(float(tokens), 1.0)
        scores.heads.append(heads / tokens)
        scores.kv_heads.append(kv_heads)
        scores.ffn.append(ffn / tokens)
    for layer_hidden in sums["hidden"]:
        layer_hidden = layer_hidden / n_windows
        scores.hidden = layer_hidden if scores.hidden is None else scores.hidden + layer_hidden
    scores.layers = 1 - influence / n_windows
    return scores


def _weight_scores(model: nn.Module, layout: PruningLayout, per_weight) -> Scores:
    """Sum ``per_weight(module)`` (a tensor shaped like the ``[out, in]`` weight) over each unit."""
    scores = Scores("")
    for name, block in zip(block_names(model), decoder_blocks(model)):
        with resident(model, name):  # a model on disk: this block read in for its scores
            _add_block_scores(scores, block, layout, per_weight)
    return scores


def _add_block_scores(scores: Scores, block: nn.Module, layout: PruningLayout, per_weight) -> None:
    """One block's head, key/value head and FFN channel scores, appended to ``scores``."""
    hd = layout.head_dim()
    sizes = layout.sizes(block)
    att = layout.attention
    out = per_weight(block.get_submodule(att.out))  # [hidden, H * hd]
    heads = out.reshape(out.shape[0], sizes.heads, hd).sum(dim=(0, 2))
    if att.qkv:  # a head owns its rows of the fused projection, wherever they lie
        rows = per_weight(block.get_submodule(att.qkv)).sum(1)
        heads = heads + torch.stack([rows[head_rows(att, sizes, hd, [h], [])].sum() for h in range(sizes.heads)])
        kv_heads = torch.stack([rows[head_rows(att, sizes, hd, [], [j])].sum() for j in range(sizes.kv_heads)])
    else:
        q, k, v = (per_weight(block.get_submodule(p)).sum(1) for p in (att.q, att.k, att.v))
        heads = heads + q.reshape(sizes.heads, hd).sum(1)
        kv_heads = (k + v).reshape(sizes.kv_heads, hd).sum(1)
    width = sizes.ffn
    if layout.mlp is None:
        scores.heads.append(heads.float().cpu())
        scores.kv_heads.append(kv_heads.float().cpu())
        scores.ffn.append(torch.zeros(0))
        return
    ffn = per_weight(block.get_submodule(layout.mlp.out)).sum(0)
    for path in layout.mlp.inputs:
        ffn = ffn + per_weight(block.get_submodule(path)).sum(1)
    for path in layout.mlp.fused:
        rows = per_weight(block.get_submodule(path)).sum(1)
        ffn = ffn + rows[:width] + rows[width:]
    scores.heads.append(heads.float().cpu())
    scores.kv_heads.append(kv_heads.float().cpu())
    scores.ffn.append(ffn.float().cpu())


def _embedding_columns(model: nn.Module, per_weight) -> torch.Tensor:
    embed = model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embed)
    with resident(model, name):
        return per_weight(embed).sum(0).float().cpu()


@torch.no_grad()
def magnitude_scores(model: nn.Module, layout: PruningLayout, hidden: bool = False) -> Scores:
    """Squared weight norms of each unit's slices."""

    def squared(module):
        weight = module.weight if isinstance(module, nn.Embedding) else linear_weight(module)
        return weight.detach().float() ** 2

    scores = _weight_scores(model, layout, squared)
    scores.method = "magnitude"
    if hidden:
        scores.hidden = _embedding_columns(model, squared)
    return scores


def taylor_scores(model: nn.Module, layout: PruningLayout, windows: torch.Tensor, hidden: bool = False) -> Scores:
    """First-order Taylor importance: per window, ``(sum of w * dL/dw)**2`` over each head, key/value
    head and channel, averaged over ``windows`` (Molchanov et al., 2019)."""
    if not (hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None):
        raise PruningError(
            f"importance: taylor needs a language-modelling loss, and {type(model).__name__} has no LM head; "
            "load the model with its head (AutoModelForCausalLM / AutoModelForMaskedLM) or use importance: "
            "activation or magnitude"
        )
    device = next(model.parameters()).device
    was_training = model.training
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None

    def first_order(module):
        weight = module.weight if isinstance(module, nn.Embedding) else linear_weight(module)
        grad = weight.grad if isinstance(module, nn.Embedding) else linear_weight_grad(module)
        return weight.detach().float() * grad.float()

    scores = Scores("taylor")
    try:
        for window in tqdm(windows, desc="importance (taylor)", unit="window"):
            ids = window[None].to(device)
            with torch.enable_grad():
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            # Per window, the squared first-order loss change of removing each head, key/value head
            # and channel, averaged over windows: signs differ between windows, squares do not cancel.
            window_scores = _weight_scores(model, layout, first_order)
            if hidden:
                window_scores.hidden = _embedding_columns(model, first_order)
            _accumulate_squares(scores, window_scores, 1 / len(windows))
            for p in model.parameters():
                p.grad = None
    finally:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[name])
        model.train(was_training)
    return scores


def _accumulate_squares(total: Scores, window: Scores, weight: float) -> None:
    for name in ("heads", "kv_heads", "ffn"):
        parts = getattr(window, name)
        if not getattr(total, name):
            setattr(total, name, [weight * t**2 for t in parts])
        else:
            for acc, t in zip(getattr(total, name), parts):
                acc += weight * t**2
    if window.hidden is not None:
        squared = weight * window.hidden**2
        total.hidden = squared if total.hidden is None else total.hidden + squared
