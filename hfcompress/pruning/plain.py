"""Can the model's own config describe a pruned model? Asked of transformers, not guessed.

After pruning, the sizes that are the same in every layer are written into the config under the
keys the config uses (``num_attention_heads`` and its aliases, the key/value head count, an
explicit ``head_dim``, the FFN width, the expert count). Whether that is enough depends on the
family's code, which may derive the head size from ``hidden_size / heads`` whatever the config
says; so :func:`config_expresses` builds the model class from the new config on the meta device
and compares every tensor's shape with the pruned model's. Only when they agree is the folder a
plain checkpoint.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..models import model_configs

logger = logging.getLogger(__name__)

KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num", "n_kv_heads")
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "inner_hidden_size",
            "intermediate_dim", "mlp_dim", "ffn_hidden_dim", "hidden_dim")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")


def ffn_key(config, ffn: int) -> str | None:
    """The config key that holds the FFN width ``ffn`` (GPT-2's ``n_inner: null`` means 4 x hidden)."""
    for key in FFN_KEYS:
        if getattr(config, key, None) == ffn:
            return key
    if hasattr(config, "n_inner") and config.n_inner is None and 4 * config.hidden_size == ffn:
        return "n_inner"
    return None


def _set(config, key: str, value, changes: list) -> None:
    try:
        old = getattr(config, key, None)
        setattr(config, key, value)
    except (AttributeError, TypeError):  # a read-only property (Falcon's head_dim)
        return
    changes.append((config, key, old))


def set_config_sizes(model: nn.Module, heads: int | None = None, kv_heads: int | None = None,
                     head_dim: int | None = None, ffn: tuple[int, int] | None = None,
                     experts: tuple[int, int] | None = None, hidden: int | None = None) -> list:
    """Write new sizes into every config of ``model``; returns the changes, for :func:`revert`.

    ``ffn`` and ``experts`` are ``(old, new)``: the key is the one holding the old value.
    """
    changes: list = []
    for config in model_configs(model):
        if heads is not None:
            _set(config, "num_attention_heads", heads, changes)
            for key in KV_KEYS:
                if isinstance(getattr(config, key, None), int):
                    _set(config, key, kv_heads, changes)
                    break
        if head_dim is not None:
            _set(config, "head_dim", head_dim, changes)
        if ffn is not None:
            key = ffn_key(config, ffn[0])
            if key is not None:
                _set(config, key, ffn[1], changes)
        if experts is not None:
            for key in EXPERT_KEYS:
                if getattr(config, key, None) == experts[0]:
                    _set(config, key, experts[1], changes)
        if hidden is not None:
            _set(config, "hidden_size", hidden, changes)
    return changes


def revert(changes: list) -> None:
    for config, key, old in reversed(changes):
        setattr(config, key, old)


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def fresh_shapes(model: nn.Module) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of ``type(model)`` built from its current config (meta device), or None when
    transformers cannot build it from that config."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception as err:  # noqa: BLE001  (any failure means: the config does not describe it)
        logger.debug("%s cannot be built from the pruned config: %s", type(model).__name__, err)
        return None
    return shapes(fresh)


def config_expresses(model: nn.Module) -> bool:
    """Whether a model built from ``model.config`` has exactly ``model``'s tensor shapes."""
    return fresh_shapes(model) == shapes(model)
