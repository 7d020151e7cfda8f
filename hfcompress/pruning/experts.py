"""Expert pruning: drop the experts of every MoE layer that the router uses least.

An expert's importance is the routing weight it receives over the calibration windows (the sum,
over tokens, of the router's weight for it among each token's top-k): an expert the router
rarely picks, or picks with little weight, contributes least to the layer's output. Every MoE
layer drops the same number of experts (its own least important ones), so the config's expert
count describes the result and the folder stays a plain checkpoint. The router's rows for the
dropped experts go too (its weight ``[E, hidden]`` and any per-expert bias), so tokens are
routed among the experts that remain, with the same top-k.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..calibration import walk_blocks
from ..context import CompressionContext
from ..models import find_fused_experts, model_configs
from ..models.experts import _INDEX_NAMES, _WEIGHT_NAMES
from ..recipe import PruneStage
from .layout import PruningError
from .select import remove_count

logger = logging.getLogger(__name__)


def _router(model: nn.Module, experts_name: str, count: int) -> tuple[str, nn.Module]:
    """The sibling of an experts module that scores the experts: a ``[E, hidden]`` weight."""
    parent_name = experts_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    for name, module in parent.named_children():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == count:
            return f"{parent_name}.{name}", module
    raise PruningError(f"experts: no router with one row per expert found beside {experts_name}; this MoE layout "
                       "cannot be pruned by experts")


def _slice_experts(module: nn.Module, keep: torch.Tensor, count: int) -> None:
    """Keep entries ``keep`` along the first dimension of every tensor indexed by expert."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.shape[0] == count:
            setattr(module, name, nn.Parameter(param.detach()[keep.to(param.device)].contiguous(),
                                               requires_grad=param.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.dim() and buffer.shape[0] == count:
            setattr(module, name, buffer[keep.to(buffer.device)].contiguous())
    for name, value in vars(module).items():
        if name in ("num_experts", "n_routed_experts", "num_local_experts") and value == count:
            setattr(module, name, len(keep))


@torch.no_grad()
def expert_scores(model: nn.Module, experts: dict[str, nn.Module], windows: torch.Tensor, device=None,
                  dtype=None) -> dict[str, torch.Tensor]:
    """Routing weight each expert of each layer receives over ``windows``."""
    scores = {name: torch.zeros(module.num_experts) for name, module in experts.items()}
    by_id = {id(module): name for name, module in experts.items()}

    def hook(module, args, kwargs):
        index = args[1] if len(args) > 1 else next(kwargs[n] for n in _INDEX_NAMES if n in kwargs)
        weight = args[2] if len(args) > 2 else next(kwargs[n] for n in _WEIGHT_NAMES if n in kwargs)
        total = scores[by_id[id(module)]]
        valid = (index >= 0) & (index < total.numel())
        total.index_add_(0, index[valid].flatten().cpu(), weight[valid].float().flatten().cpu())

    for step in walk_blocks(model, windows, device, dtype):
        if not step.reached:
            continue
        step.hooks += [m.register_forward_pre_hook(hook, with_kwargs=True)
                       for m in step.block.modules() if id(m) in by_id]  # run by the walk's own pass
    return scores


def prune_experts(model: nn.Module, stage: PruneStage, context: CompressionContext) -> None:
    """Drop ``stage.experts`` experts (a fraction or a count) from every MoE layer."""
    experts = find_fused_experts(model)
    if not experts:
        raise PruningError(f"experts: {type(model).__name__} has no Mixture-of-Experts layers with transformers' "
                           "fused expert weights; remove the experts key")
    counts = {module.num_experts for module in experts.values()}
    if len(counts) != 1:
        raise PruningError("experts: the MoE layers differ in expert count; prune experts once, from the original")
    count = counts.pop()
    n = remove_count(stage.experts, count, 1, "experts")
    if not n:
        return
    keep_count = count - n
    for config in model_configs(model):
        top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
        if isinstance(top_k, int) and top_k > keep_count:
            raise PruningError(f"experts: keeping {keep_count} of {count} experts leaves fewer than the {top_k} each "
                               f"token is routed to; remove at most {count - top_k}")
        groups = getattr(config, "n_group", None)
        if isinstance(groups, int) and groups > 1 and keep_count % groups:
            raise PruningError(f"experts: the router picks among {groups} groups of experts, so the experts kept "
                               f"({keep_count}) must be a multiple of {groups}")
    dtype = context.compute_dtype(model)
    scores = expert_scores(model, experts, context.calibration_windows(), context.device, dtype)
    for name, module in experts.items():
        keep = torch.sort(scores[name].argsort(descending=True)[:keep_count]).values
        router_name, router = _router(model, name, count)
        _slice_experts(module, keep, count)
        _slice_experts(router, keep, count)
        parent = model.get_submodule(name.rpartition(".")[0])
        _slice_experts(parent, keep, count)
        logger.debug("%s: kept experts %s", name, keep.tolist())
    from .plain import set_config_sizes

    set_config_sizes(model, experts=(count, keep_count))
    logger.info("experts: %d -> %d per MoE layer in %d layers (least routing weight dropped)", count, keep_count,
                len(experts))
