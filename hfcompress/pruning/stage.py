"""The ``prune`` stage: score, choose, slice, and rewrite the config so the result reloads.

Order: all scores are measured on the model as it comes in (Minitron's one-shot importance),
then heads and FFN channels are cut in every layer, hidden channels across the model, and last
whole layers are dropped.

What the saved folder needs to reload:

- sizes that are the same in every layer, and that the family's config can express, go into the
  config itself (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
  ``intermediate_size``/``ffn_dim``/``n_inner``, ``hidden_size``, ``num_hidden_layers``): the
  folder is a plain checkpoint that transformers loads without hfcompress;
- anything else (per-layer sizes; heads of GPT-2, OPT and BERT, whose head size the config derives
  from ``hidden_size / heads``) is recorded per layer in our ``quantization_config``
  (``pruned``), and ``from_pretrained`` rebuilds those shapes before the weights load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import CompressionConfig
from ..models import BLOCK_PATHS, decoder_blocks, model_configs
from ..recipe import PruneStage
from .importance import Scores, activation_scores, magnitude_scores, taylor_scores
from .layout import Family, LayerSizes, PruningError, family_of, keep_inputs, keep_outputs
from .select import choose, head_units, remove_count

logger = logging.getLogger(__name__)


# --- scores -------------------------------------------------------------------------------------


def compute_scores(model: nn.Module, family: Family, stage: PruneStage, context) -> Scores:
    """The stage's importance scores (Block Influence for layers included when layers are dropped)."""
    hidden = bool(stage.hidden)
    dtype = getattr(torch, context.calibration.dtype) if context.calibration.dtype else None
    if stage.importance == "activation":
        return activation_scores(model, family, context.calibration_windows(), context.device, dtype, hidden)
    if stage.importance == "magnitude":
        scores = magnitude_scores(model, family, hidden)
    else:
        scores = taylor_scores(model, family, context.calibration_windows(), hidden)
    if stage.layers:
        scores.layers = activation_scores(model, family, context.calibration_windows(), context.device, dtype).layers
    return scores


def load_or_compute_scores(model: nn.Module, family: Family, stage: PruneStage, context) -> Scores:
    """Scores from ``stage.scores`` when that file exists (same measure, same shapes), else computed
    (and written there when a path is given)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(stage.scores) if stage.scores else None
    if path is not None and path.exists():
        with safe_open(str(path), "pt") as f:
            method = (f.metadata() or {}).get("importance")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if method != stage.importance:
            raise PruningError(f"scores: {path} holds {method!r} importance, the stage asks for {stage.importance!r}; "
                               "delete the file or point scores: elsewhere")
        scores = Scores.from_tensors(method, tensors)
        blocks = decoder_blocks(model)
        shapes = [family.sizes(b) for b in blocks]
        if len(scores.heads) != len(blocks) or any(
                len(h) != s.heads or len(f) != s.ffn for h, f, s in zip(scores.heads, scores.ffn, shapes)):
            raise PruningError(f"scores: {path} was computed for a model of other shapes; delete it to recompute")
        if (stage.layers and scores.layers is None) or (stage.hidden and scores.hidden is None):
            raise PruningError(f"scores: {path} lacks layer or hidden-channel scores this stage needs; delete it")
        logger.info("importance scores read from %s", path)
        return scores
    scores = compute_scores(model, family, stage, context)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(scores.to_tensors(), str(path), metadata={"importance": stage.importance})
        logger.info("importance scores written to %s", path)
    return scores


# --- pruning ------------------------------------------------------------------------------------


def _prune_heads(blocks, family: Family, scores: Scores, stage: PruneStage) -> dict[int, list[int]]:
    """Cut heads in every block; returns the removed query heads per layer (original numbering)."""
    sizes = [family.sizes(b) for b in blocks]
    if len({(s.heads, s.kv_heads) for s in sizes}) != 1:
        raise PruningError("heads: the model's layers already differ in head counts; prune heads once, from the original")
    H, KV = sizes[0].heads, sizes[0].kv_heads
    if stage.gqa == "per_group" and H == KV:
        raise PruningError(
            f"gqa: per_group removes query heads inside key/value groups, but this model has {H} query and {KV} "
            "key/value heads (one query head per group); use gqa: groups"
        )
    unit_size = H // KV if stage.gqa == "groups" else KV
    n_heads = remove_count(stage.heads, H, unit_size, "heads")
    if not n_heads:
        return {}
    units = [head_units(s, scores.heads[i], scores.kv_heads[i], stage.gqa) for i, s in enumerate(sizes)]
    removed = choose([[u.score for u in layer] for layer in units], n_heads // unit_size, stage.uniform,
                     ordered=stage.gqa == "per_group")
    pruned = {}
    for i, (block, layer_units, gone) in enumerate(zip(blocks, units, removed)):
        heads = {h for k in gone for h in layer_units[k].heads}
        kv = {j for k in gone for j in layer_units[k].kv_heads}
        family.keep_heads(block, [h for h in range(H) if h not in heads], [j for j in range(KV) if j not in kv])
        pruned[i] = sorted(heads)
    logger.info("heads: %d -> %s query heads per layer, key/value heads %d -> %s (gqa: %s, importance: %s)",
                H, _span(family.sizes(b).heads for b in blocks), KV, _span(family.sizes(b).kv_heads for b in blocks),
                stage.gqa, scores.method)
    return pruned


def _prune_ffn(blocks, family: Family, scores: Scores, stage: PruneStage) -> None:
    sizes = [family.sizes(b).ffn for b in blocks]
    if len(set(sizes)) != 1:
        raise PruningError("ffn: the model's layers already differ in FFN size; prune the FFN once, from the original")
    n = remove_count(stage.ffn, sizes[0], 1, "FFN channels")
    if not n:
        return
    removed = choose([scores.ffn[i].abs().tolist() for i in range(len(blocks))], n, stage.uniform)
    for block, gone in zip(blocks, removed):
        family.keep_ffn(block, [c for c in range(sizes[0]) if c not in gone])
    logger.info("FFN channels: %d -> %s per layer (importance: %s)", sizes[0],
                _span(family.sizes(b).ffn for b in blocks), scores.method)


def _prune_hidden(model: nn.Module, blocks, family: Family, scores: Scores, stage: PruneStage) -> None:
    """Remove hidden (embedding) channels everywhere they appear: embeddings, norms, every block's
    input and output projections, the final norm and the LM head (tied or not)."""
    embed = model.get_input_embeddings()
    width = embed.weight.shape[1]
    n = remove_count(stage.hidden, width, 1, "hidden channels")
    if not n:
        return
    keep = torch.sort(scores.hidden.abs().argsort(descending=True)[: width - n]).values
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    embed.weight = nn.Parameter(embed.weight.detach()[:, keep].contiguous(), requires_grad=embed.weight.requires_grad)
    embed.embedding_dim = len(keep)
    if head is not None:
        if tied:
            head.weight = embed.weight
            head.in_features = len(keep)
        else:
            keep_inputs(head, keep)
    final_norm = getattr(model.base_model, "norm", None)
    for norm in [*(block.get_submodule(p) for block in blocks for p in family.norms), final_norm]:
        if norm is not None:
            norm.weight = nn.Parameter(norm.weight.detach()[keep].contiguous(), requires_grad=norm.weight.requires_grad)
    for block in blocks:
        for path in (*family.qkv, *family.ffn_in):
            keep_inputs(block.get_submodule(path), keep)
        for path in (family.out, family.ffn_out):
            keep_outputs(block.get_submodule(path), keep)
    for config in model_configs(model):
        config.hidden_size = len(keep)
    logger.info("hidden channels: %d -> %d (importance: %s)", width, len(keep), scores.method)


def _drop_layers(model: nn.Module, blocks: nn.ModuleList, scores: Scores, stage: PruneStage) -> list[int]:
    n = stage.layers
    if n >= len(blocks):
        raise PruningError(f"layers: cannot remove {n} of {len(blocks)} layers; keep at least one")
    drop = sorted(scores.layers.argsort()[:n].tolist())
    kept = [b for i, b in enumerate(blocks) if i not in drop]
    for index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index  # the KV cache is indexed by position in the stack
    base = getattr(model, "base_model", model)
    base.set_submodule(BLOCK_PATHS[model.config.model_type], nn.ModuleList(kept))
    for config in model_configs(model):
        config.num_hidden_layers = len(kept)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in drop]
    logger.info("layers: dropped %s (least Block Influence), %d left", drop, len(kept))
    return drop


def _span(values) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}..{high}"


def _write_config(model: nn.Module, family: Family, blocks, config: CompressionConfig) -> None:
    """Put uniform, expressible sizes in the model's config; record the rest in ours."""
    sizes = [family.sizes(b) for b in blocks]
    head_dim = family.head_dim(blocks[0])
    configs = model_configs(model)
    original = family.config_sizes(configs[-1])
    uniform = len(set(sizes)) == 1
    for cfg in configs:
        if uniform and sizes[0].ffn != original.ffn:
            setattr(cfg, family.ffn_key, sizes[0].ffn)
        if uniform and family.plain_heads and (sizes[0].heads, sizes[0].kv_heads) != (original.heads, original.kv_heads):
            setattr(cfg, family.heads_key, sizes[0].heads)
            if family.kv_heads_key:
                setattr(cfg, family.kv_heads_key, sizes[0].kv_heads)
            cfg.head_dim = head_dim  # explicit: it no longer equals hidden_size / heads
    expected = family.config_sizes(configs[-1])
    if all(s == expected for s in sizes):
        config.pruned = None
        return
    config.pruned = {"head_dim": head_dim, "layers": [s.to_dict() for s in sizes]}
    logger.info("per-layer sizes recorded in quantization_config.pruned: reloading this model needs "
                "`import hfcompress`")


@torch.no_grad()
def apply_prune_stage(model: nn.Module, stage: PruneStage, config: CompressionConfig, context) -> None:
    """Prune ``model`` in place as the stage says."""
    family = family_of(model)
    blocks = decoder_blocks(model)
    if config.modules:
        raise PruningError("prune: the model is already quantized; put the prune stage before quantize")
    if config.shared:
        raise PruningError("prune: decoder layers of this model share weights, which per-layer pruning would cut "
                           "differently; put the prune stage before share")
    if not (stage.heads or stage.ffn or stage.hidden or stage.layers):
        logger.info("prune: nothing to remove")
        return
    if stage.hidden and not family.norms:
        raise PruningError(
            f"hidden: pruning hidden channels supports the llama, mistral and qwen2 families, not "
            f"{model.config.model_type!r}; remove the hidden key"
        )
    scores = load_or_compute_scores(model, family, stage, context)
    pruned_heads, dropped = {}, []
    if stage.heads:
        pruned_heads = _prune_heads(blocks, family, scores, stage)
    if stage.ffn:
        _prune_ffn(blocks, family, scores, stage)
    if stage.hidden:
        _prune_hidden(model, blocks, family, scores, stage)
    if stage.layers:
        dropped = _drop_layers(model, blocks, scores, stage)
    if pruned_heads and not family.plain_heads:
        # transformers' own bookkeeping (config.pruned_heads: layer -> removed heads, original
        # numbering), renumbered past dropped layers. transformers 5 no longer acts on it; the
        # shapes reload from quantization_config.pruned.
        kept = [i for i in range(len(blocks)) if i not in dropped]
        for cfg in model_configs(model):
            cfg.pruned_heads = {str(new): pruned_heads[old] for new, old in enumerate(kept) if pruned_heads.get(old)}
    _write_config(model, family, decoder_blocks(model), config)


def rebuild_pruned_structure(model: nn.Module, config: CompressionConfig) -> None:
    """Give a freshly built model the per-layer shapes recorded in ``config.pruned`` (before loading)."""
    if not config.pruned:
        return
    family = family_of(model)
    blocks = decoder_blocks(model)
    layers = [LayerSizes(**sizes) for sizes in config.pruned["layers"]]
    if len(layers) != len(blocks):
        raise PruningError(f"quantization_config.pruned describes {len(layers)} layers, the model has {len(blocks)}")
    for block, sizes in zip(blocks, layers):
        family.reshape(block, sizes, config.pruned["head_dim"])
