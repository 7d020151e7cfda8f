"""The ``prune`` stage: score, choose, slice, and rewrite the config so the result reloads.

Order: all scores are measured on the model as it comes in (Minitron's one-shot importance),
then heads and FFN channels are cut in every layer, hidden channels across the model, and last
whole layers are dropped.

What the saved folder needs to reload:

- sizes that are the same in every layer go into the config itself (the head counts, an explicit
  ``head_dim``, the FFN width under whichever key the config uses, ``hidden_size``,
  ``num_hidden_layers``). Whether the config can express them is not guessed per family: the
  model class is built from the new config on the meta device and its shapes compared with the
  pruned model's. When they agree the folder is a plain checkpoint that transformers loads
  without hfcompress;
- anything else (per-layer sizes; heads of families whose attention derives the head size from
  ``hidden_size / heads``, such as GPT-2, OPT, BERT, GPT-NeoX, Falcon and StableLM) is recorded
  per layer in our ``quantization_config`` (``pruned``), and ``from_pretrained`` rebuilds those
  shapes before the weights load.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..config import CompressionConfig, PrunedRecord
from ..context import CompressionContext
from ..errors import CheckpointError
from ..models import (block_names, blocks_path, decoder_blocks, final_norm, keep_inputs, keep_outputs, linear_shape, model_configs,
                      weight_shape)
from ..recipe import PruneStage
from ..residency import by_unit, resident, store_of
from ..models.layout import HEADS_FIXED
from .experts import prune_experts
from .importance import Scores, activation_scores, magnitude_scores, taylor_scores
from .layout import LayerSizes, PruningError, PruningLayout, layout_of
from .plain import set_config_sizes
from .select import choose, head_units, remove_count

logger = logging.getLogger(__name__)


# --- scores -------------------------------------------------------------------------------------


def compute_scores(model: nn.Module, layout: PruningLayout | None, stage: PruneStage, context: CompressionContext) -> Scores:
    """The stage's importance scores (Block Influence for layers included when layers are dropped)."""
    hidden = bool(stage.hidden)
    dtype = context.compute_dtype(model)
    if layout is None:  # whole layers only: Block Influence
        return activation_scores(model, None, context.calibration_windows(), context.device, dtype)
    if stage.importance == "activation":
        return activation_scores(model, layout, context.calibration_windows(), context.device, dtype, hidden)
    if stage.importance == "magnitude":
        scores = magnitude_scores(model, layout, hidden)
    else:
        scores = taylor_scores(model, layout, context.calibration_windows(), hidden)
    if stage.layers:
        scores.layers = activation_scores(model, layout, context.calibration_windows(), context.device, dtype).layers
    return scores


def load_or_compute_scores(model: nn.Module, layout: PruningLayout | None, stage: PruneStage, context: CompressionContext) -> Scores:
    """Scores from ``stage.scores`` when that file exists (same measure, same shapes), else computed
    (and written there when a path is given)."""
    from safetensors import safe_open

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
        shapes = [layout.sizes(b) for b in blocks] if layout is not None else []
        if layout is not None and len(scores.heads) != len(blocks) or any(
                len(h) != s.heads or len(f) != s.ffn for h, f, s in zip(scores.heads, scores.ffn, shapes)):
            raise PruningError(f"scores: {path} was computed for a model of other shapes; delete it to recompute")
        if (stage.layers and scores.layers is None) or (stage.hidden and scores.hidden is None):
            raise PruningError(f"scores: {path} lacks layer or hidden-channel scores this stage needs; delete it")
        logger.info("importance scores read from %s", path)
        return scores
    scores = compute_scores(model, layout, stage, context)
    if path is not None:
        scores.save(path)
        logger.info("importance scores written to %s", path)
    return scores


# --- pruning ------------------------------------------------------------------------------------


def _counts(amounts: list, total: int, unit: int, what: str) -> list[int]:
    """Units each layer removes, from its amount (each distinct amount converted, and logged, once)."""
    units = {amount: remove_count(amount, total, unit, what) // unit for amount in dict.fromkeys(amounts)}
    return [units[amount] for amount in amounts]


def _one_or_each(counts: list[int]) -> int | list[int]:
    """One count for every layer (which ``uniform: false`` spreads across layers), or each layer's own."""
    return counts[0] if len(set(counts)) == 1 else counts


def _prune_heads(model: nn.Module, blocks, layout: PruningLayout, scores: Scores, stage: PruneStage) -> dict[int, list[int]]:
    """Cut heads in every block; returns the removed query heads per layer (original numbering)."""
    sizes = [layout.sizes(b) for b in blocks]
    if len({(s.heads, s.kv_heads) for s in sizes}) != 1:
        raise PruningError("heads: the model's layers already differ in head counts; prune heads once, from the original")
    H, KV = sizes[0].heads, sizes[0].kv_heads
    if stage.gqa == "per_group" and H == KV:
        raise PruningError(
            f"gqa: per_group removes query heads inside key/value groups, but this model has {H} query and {KV} "
            "key/value heads (one query head per group); use gqa: groups"
        )
    unit_size = H // KV if stage.gqa == "groups" else KV
    counts = _counts([stage.amounts(i)[0] for i in range(len(blocks))], H, unit_size, "heads")
    if not any(counts):
        return {}
    units = [head_units(s, scores.heads[i], scores.kv_heads[i], stage.gqa) for i, s in enumerate(sizes)]
    removed = choose([[u.score for u in layer] for layer in units], _one_or_each(counts), stage.uniform,
                     ordered=stage.gqa == "per_group")
    pruned, names = {}, block_names(model)
    for i, (block, layer_units, gone) in enumerate(zip(blocks, units, removed)):
        heads = {h for k in gone for h in layer_units[k].heads}
        kv = {j for k in gone for j in layer_units[k].kv_heads}
        with resident(model, names[i]):  # a model on disk: one block in memory while it is cut
            layout.keep_heads(block, [h for h in range(H) if h not in heads], [j for j in range(KV) if j not in kv])
        pruned[i] = sorted(heads)
    logger.info("heads: %d -> %s query heads per layer, key/value heads %d -> %s (gqa: %s, importance: %s)",
                H, _span(layout.sizes(b).heads for b in blocks), KV, _span(layout.sizes(b).kv_heads for b in blocks),
                stage.gqa, scores.method)
    return pruned


def _prune_ffn(model: nn.Module, blocks, layout: PruningLayout, scores: Scores, stage: PruneStage) -> None:
    sizes = [layout.sizes(b).ffn for b in blocks]
    if len(set(sizes)) != 1:
        raise PruningError("ffn: the model's layers already differ in FFN size; prune the FFN once, from the original")
    counts = _counts([stage.amounts(i)[1] for i in range(len(blocks))], sizes[0], 1, "FFN channels")
    if not any(counts):
        return
    removed = choose([scores.ffn[i].abs().tolist() for i in range(len(blocks))], _one_or_each(counts), stage.uniform)
    for name, block, gone in zip(block_names(model), blocks, removed):
        with resident(model, name):
            layout.keep_ffn(block, [c for c in range(sizes[0]) if c not in gone])
    logger.info("FFN channels: %d -> %s per layer (importance: %s)", sizes[0],
                _span(layout.sizes(b).ffn for b in blocks), scores.method)


def _hidden_plan(model: nn.Module, blocks, layout: PruningLayout) -> list[tuple[nn.Module, str]]:
    """Every tensor that holds the hidden size, with how it is cut: ``("in", linear)``,
    ``("out", linear)``, ``("vector", module)`` (norm weight and bias) or ``("embedding", module)``."""
    plan: list[tuple[str, nn.Module]] = [("embedding", model.get_input_embeddings())]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        plan.append(("embedding" if head.weight is model.get_input_embeddings().weight else "in", head))
    att, mlp = layout.attention, layout.mlp
    for block in blocks:
        plan += [("in", block.get_submodule(p)) for p in ((att.qkv,) if att.qkv else (att.q, att.k, att.v))]
        plan += [("in", block.get_submodule(p)) for p in (*mlp.inputs, *mlp.fused)]
        plan += [("out", block.get_submodule(att.out)), ("out", block.get_submodule(mlp.out))]
        plan += [("vector", block.get_submodule(p)) for p in layout.block.norms]
    norm = final_norm(model)
    if norm is not None:
        plan.append(("vector", norm))
    return plan


def _check_hidden_expressible(model: nn.Module, plan, width: int, keep: int, layout: PruningLayout,
                              original: LayerSizes) -> None:
    """Refuse, before cutting anything, a hidden-size prune that the config could not describe
    (absolute position embeddings, head sizes derived from the hidden size, ...)."""
    from .plain import fresh_shapes, revert, shapes

    expected = shapes(model)
    names = {id(module): name for name, module in model.named_modules()}
    for kind, module in plan:
        prefix = names[id(module)]
        if kind in ("in", "out"):
            in_features, out_features = linear_shape(module)
            sizes = (keep, out_features) if kind == "in" else (in_features, keep)
            expected[f"{prefix}.weight"] = weight_shape(module, *sizes)
            if getattr(module, "bias", None) is not None:
                expected[f"{prefix}.bias"] = (sizes[1],)
        elif kind == "embedding":
            expected[f"{prefix}.weight"] = (module.weight.shape[0], keep)
        else:
            for name in ("weight", "bias"):
                if isinstance(getattr(module, name, None), nn.Parameter):
                    expected[f"{prefix}.{name}"] = (keep,)
    changes = set_config_sizes(model, hidden=keep, head_dim=layout.head_dim())
    now = layout.sizes(decoder_blocks(model)[0])  # heads and FFN cut earlier in this stage
    if (now.heads, now.kv_heads) != (original.heads, original.kv_heads):
        changes += set_config_sizes(model, heads=now.heads, kv_heads=now.kv_heads)
    if now.ffn != original.ffn:
        changes += set_config_sizes(model, ffn=(original.ffn, now.ffn))
    try:
        fresh = fresh_shapes(model)
    finally:
        revert(changes)
    if fresh != expected:
        differ = sorted(k for k in expected if fresh is None or fresh.get(k) != expected[k])[:3]
        raise PruningError(
            f"hidden: {model.config.model_type!r} keeps the hidden size in tensors that pruning cannot cut "
            f"consistently with its config (e.g. {', '.join(differ) or 'the config itself'}); remove the hidden key"
        )


def _prune_hidden(model: nn.Module, blocks, layout: PruningLayout, scores: Scores, stage: PruneStage,
                  original: LayerSizes) -> None:
    """Remove hidden (embedding) channels everywhere they appear: embeddings, every block's input and
    output projections and norms, the final norm and the LM head (tied or not)."""
    embed = model.get_input_embeddings()
    width = embed.weight.shape[1]
    n = remove_count(stage.hidden, width, 1, "hidden channels")
    if not n:
        return
    plan = _hidden_plan(model, blocks, layout)
    _check_hidden_expressible(model, plan, width, width - n, layout, original)
    keep = torch.sort(scores.hidden.abs().argsort(descending=True)[: width - n]).values
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embed.weight
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    # A tied head is the embedding's matrix, cut once with it.
    kinds = {names[id(module)]: (kind, module) for kind, module in plan if not (tied and module is head)}
    for unit, members in by_unit(model, kinds):  # a model on disk: each unit in memory while it is cut
        with resident(model, unit):
            for name in members:
                _cut_hidden(*kinds[name], keep)
    if tied:
        head.weight = embed.weight
        head.in_features = len(keep)
        store = store_of(model)
        if store is not None:  # on disk: the head's name now reads the cut embedding
            store.alias(f"{names[id(head)]}.weight", f"{names[id(embed)]}.weight")
    set_config_sizes(model, hidden=len(keep), head_dim=layout.head_dim())
    logger.info("hidden channels: %d -> %d (importance: %s)", width, len(keep), scores.method)


def _cut_hidden(kind: str, module: nn.Module, keep: torch.Tensor) -> None:
    """Keep the hidden channels ``keep`` of one entry of :func:`_hidden_plan`."""
    if kind == "embedding":
        module.weight = nn.Parameter(module.weight.detach()[:, keep].contiguous(),
                                     requires_grad=module.weight.requires_grad)
        module.embedding_dim = len(keep)
    elif kind == "in":
        keep_inputs(module, keep)
    elif kind == "out":
        keep_outputs(module, keep)
    else:
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                setattr(module, name, nn.Parameter(param.detach()[keep].contiguous(),
                                                   requires_grad=param.requires_grad))


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
    model.set_submodule(blocks_path(model), nn.ModuleList(kept))
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


def _write_config(model: nn.Module, layout: PruningLayout | None, blocks, config: CompressionConfig,
                  original: LayerSizes | None) -> None:
    """Put uniform sizes in the model's config when it can express them; record the rest in ours."""
    from .plain import config_expresses, revert

    sizes = [layout.sizes(b) for b in blocks] if layout is not None else []
    changes = []
    if sizes and len(set(sizes)) == 1 and original is not None:
        now = sizes[0]
        if (now.heads, now.kv_heads) != (original.heads, original.kv_heads):
            changes += set_config_sizes(model, heads=now.heads, kv_heads=now.kv_heads, head_dim=layout.head_dim())
        if now.ffn != original.ffn:
            changes += set_config_sizes(model, ffn=(original.ffn, now.ffn))
    if config_expresses(model):
        config.pruned = None
        for block, size in zip(blocks, sizes):
            layout.set_head_counts(block, size.heads, size.kv_heads)  # layers read the config directly again
        return
    revert(changes)  # the config keeps describing the unpruned blocks, which reload reshapes
    if layout is None:
        raise PruningError(f"the pruned {model.config.model_type!r} model cannot be described by its config; "
                           "this prune is not supported for it")
    config.pruned = PrunedRecord(layout.head_dim(), list(sizes))
    logger.info("per-layer sizes recorded in quantization_config.pruned: reloading this model needs "
                "`import hfcompress`")


@torch.no_grad()
def apply_prune_stage(model: nn.Module, stage: PruneStage, config: CompressionConfig, context: CompressionContext) -> None:
    """Prune ``model`` in place as the stage says."""
    if config.modules:
        raise PruningError("prune: the model is already quantized; put the prune stage before quantize")
    if config.shared:
        raise PruningError("prune: decoder layers of this model share weights, which per-layer pruning would cut "
                           "differently; put the prune stage before share")
    blocks = decoder_blocks(model)
    beyond = sorted({i for o in stage.overrides for i in o.layers if i >= len(blocks)})
    if beyond:
        raise PruningError(f"overrides: layers {beyond} do not exist; this model has {len(blocks)} decoder layers "
                           f"(0 to {len(blocks) - 1})")
    amounts = [stage.amounts(i) for i in range(len(blocks))]
    heads, ffn = any(h for h, _ in amounts), any(f for _, f in amounts)
    if not (heads or ffn or stage.hidden or stage.layers or stage.experts):
        logger.info("prune: nothing to remove")
        return
    layout = layout_of(model, mlp=bool(ffn or stage.hidden)) if (heads or ffn or stage.hidden) else None
    if heads and layout.model_type in HEADS_FIXED:
        raise PruningError(f"heads: the heads of {layout.model_type!r} cannot be pruned: "
                           f"{HEADS_FIXED[layout.model_type]}; prune ffn or layers instead")
    original = layout.sizes(blocks[0]) if layout is not None else None
    if stage.experts:
        prune_experts(model, stage, context)
    scores = load_or_compute_scores(model, layout, stage, context) if (layout or stage.layers) else None
    pruned_heads, dropped = {}, []
    if heads:
        pruned_heads = _prune_heads(model, blocks, layout, scores, stage)
    if ffn:
        _prune_ffn(model, blocks, layout, scores, stage)
    if stage.hidden:
        _prune_hidden(model, blocks, layout, scores, stage, original)
    if stage.layers:
        dropped = _drop_layers(model, blocks, scores, stage)
    _write_config(model, layout, decoder_blocks(model), config, original)
    if pruned_heads and config.pruned:
        # The heads live in our record; transformers' own bookkeeping (config.pruned_heads: layer ->
        # removed heads, original numbering, renumbered past dropped layers) says the same.
        kept = [i for i in range(len(blocks)) if i not in dropped]
        for cfg in model_configs(model):
            cfg.pruned_heads = {str(new): pruned_heads[old] for new, old in enumerate(kept) if pruned_heads.get(old)}


def rebuild_pruned_structure(model: nn.Module, config: CompressionConfig) -> None:
    """Give a freshly built model the per-layer shapes recorded in ``config.pruned`` (before loading)."""
    if not config.pruned:
        return
    layout = layout_of(model)
    blocks = decoder_blocks(model)
    layers = config.pruned.layers
    if len(layers) != len(blocks):
        raise CheckpointError(f"config.json quantization_config.pruned describes {len(layers)} layers, the model has "
                              f"{len(blocks)}: the config is corrupt or was edited")
    # Pruning only removes: each layer's sizes fit inside the unpruned layer the model's config builds.
    full, head_dim = layout.sizes(blocks[0]), layout.head_dim()
    if config.pruned.head_dim != head_dim:
        raise CheckpointError(f"config.json quantization_config.pruned.head_dim is {config.pruned.head_dim}, the "
                              f"model's is {head_dim}: the config is corrupt or was edited")
    for i, sizes in enumerate(layers):
        if (sizes.heads > full.heads or sizes.kv_heads > full.kv_heads or sizes.ffn > full.ffn
                or sizes.heads % sizes.kv_heads):
            raise CheckpointError(f"config.json quantization_config.pruned.layers[{i}] is {sizes.to_dict()}, which does "
                                  f"not fit inside the unpruned layer {full.to_dict()} (or splits key/value groups): "
                                  "the config is corrupt or was edited")
    for block, sizes in zip(blocks, layers):
        layout.reshape(block, sizes, config.pruned.head_dim)
