"""The attention function kvsqueeze routes a model through, registered with transformers' `AttentionInterface`.

It delegates to the model's own implementation (sdpa, eager, flash) and fixes one thing: transformers
builds one attention mask per forward, sized from one layer of the cache. After compression the layers
may hold different numbers of tokens (PyramidKV, skipped layers), so each layer gets its own mask:
every stored token is visible, and the new tokens keep the causal (and padding) pattern transformers
built for them, which is the same in every layer. With nothing compressed it passes the mask through
untouched, so the model is reproduced exactly.

It also lets a method observe the queries of a layer (after RoPE and any query norm, exactly as the
model computed them), which is how scorers see queries without knowing each model family's code.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "kvsqueeze_"

# Per attention module, the callbacks that want its queries during the current forward.
query_observers: dict[torch.nn.Module, Callable[[torch.Tensor], None]] = {}


def layer_mask(mask: torch.Tensor | None, query: torch.Tensor, kv_len: int, base: str) -> torch.Tensor | None:
    """The mask for a layer holding `kv_len - q_len` stored tokens, from the mask built for the first layer."""
    q_len = query.shape[-2]
    if mask is None:
        if q_len == 1 or q_len == kv_len or base.startswith("flash"):
            return None  # sdpa and flash handle these cases without a mask
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
        if base == "eager":
            return torch.zeros(causal.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~causal, torch.finfo(query.dtype).min)
        return causal
    if mask.shape[-1] == kv_len:
        return mask
    visible = torch.ones if mask.dtype == torch.bool or mask.dim() == 2 else torch.zeros
    stored = visible(*mask.shape[:-1], kv_len - q_len, dtype=mask.dtype, device=mask.device)
    return torch.cat([stored, mask[..., -q_len:]], dim=-1)


def base_function(base: str, module: torch.nn.Module) -> Callable:
    if base == "eager":
        # eager attention is defined per model family (softcapping, sinks...): use the module's own
        return inspect.getmodule(type(module)).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def make_attention(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        observer = query_observers.get(module)
        if observer is not None:
            observer(query)
        attention_mask = layer_mask(attention_mask, query, key.shape[-2], base)
        return base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    return attention


class UnsupportedModelError(ValueError):
    """The model's attention cannot be routed through kvsqueeze."""


def install(model: PreTrainedModel) -> str:
    """Route the model's attention through kvsqueeze (idempotent). Returns the implementation's name.

    The model computes exactly what it computed before; only compressed layers get their own masks.
    """
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return current
    if current not in ("eager", "sdpa") and current not in ALL_ATTENTION_FUNCTIONS:
        raise UnsupportedModelError(f"kvsqueeze cannot wrap attention implementation {current!r}")
    if not model._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route its attention through transformers' AttentionInterface, "
            "so kvsqueeze cannot hook it")
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, make_attention(current))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise UnsupportedModelError(f"{type(model).__name__} refused the kvsqueeze attention implementation")
    return name


def uninstall(model: PreTrainedModel) -> None:
    """Give the model back its own attention implementation."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX):])
