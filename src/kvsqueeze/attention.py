"""The attention function kvsqueeze routes a model through, registered with transformers' `AttentionInterface`.

With no kvsqueeze forward running (see `forward`), it is the model's own implementation (sdpa, eager,
flash), untouched. In a forward over a kvsqueeze cache it records the layer's queries (after RoPE and any
query norm, exactly as the model computed them: how scorers see queries in every model family) and asks
the cache layer how attention reads it (`CacheLayer.attend`): a dense layer gives the model's own
function its own mask (layers may hold different numbers of tokens, while transformers builds one mask
per forward), a ragged layer attends over its pages. With nothing compressed the mask is passed through
untouched, so the model is reproduced exactly. A method with its own attention (it declares "attention":
Quest reads only some stored keys, MInference a sparse prefill) gets it on dense layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import forward

PREFIX = "kvsqueeze_"


class UnsupportedModelError(ValueError):
    """The model's attention cannot be routed through kvsqueeze."""


@dataclass
class AttentionCall:
    """One attention module's call of the attention function: what the model passed, and the model's own function
    (`fn`, of implementation `implementation`) that `run` calls, with any argument replaced."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)
    implementation: str = "sdpa"
    fn: Callable | None = None

    def run(self, **changes) -> tuple[torch.Tensor, torch.Tensor | None]:
        call = replace(self, **changes)
        return call.fn(call.module, call.query, call.key, call.value, call.mask, **call.kwargs)


def layer_mask(mask: torch.Tensor | None, query: torch.Tensor, kv_len: int, fresh: int, implementation: str):
    """A layer's mask: its kept older tokens all visible, its `fresh` most recent ones as transformers masked them.

    With nothing compressed (every stored token fresh) transformers' mask is returned untouched.
    """
    q_len = query.shape[-2]
    if mask is None:
        if q_len == 1 or q_len == kv_len or implementation.startswith("flash"):
            return None  # sdpa and flash handle these cases without a mask
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
        if implementation == "eager":
            return torch.zeros(causal.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~causal, torch.finfo(query.dtype).min)
        return causal
    if fresh == kv_len and mask.shape[-1] == kv_len:
        return mask
    visible = torch.ones if mask.dtype == torch.bool or mask.dim() == 2 else torch.zeros
    kept = visible(*mask.shape[:-1], kv_len - fresh, dtype=mask.dtype, device=mask.device)
    return torch.cat([kept.expand(*mask.shape[:-1], -1), mask[..., -fresh:]], dim=-1)


def causal_weights(query: torch.Tensor, keys: torch.Tensor, real: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention probabilities of `query` [batch, heads, n, dim], the last n stored tokens, over `keys` [batch,
    kv_heads, stored, dim]: [batch, heads, n, stored]. Query i sees the stored keys up to its own position;
    `real` [batch, kv_heads, stored] hides padding (None: none)."""
    (batch, heads, n, dim), kv_heads = query.shape, keys.shape[1]
    # each KV head's query heads against its keys (never repeated per query head), the logits scaled in place
    logits = torch.matmul(query.reshape(batch, kv_heads, -1, dim), keys.transpose(-1, -2)).float().mul_(scaling)
    if real is not None:
        logits.masked_fill_(~real[:, :, None, :], float("-inf"))
    logits = logits.view(batch, heads, n, -1)
    logits[..., -n:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=logits.device).triu(1), float("-inf"))
    return logits.softmax(dim=-1)


def attend_to(call: AttentionCall, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's attention reading only the stored tokens at `index` [batch, kv_heads, n] (positions in the key,
    each KV head its own, in increasing order): the other keys and values are never read.

    The mask's columns follow the kept tokens; without a mask, a multi-token query stays causal.
    """
    def gather(states):
        return states.gather(2, index[..., None].expand(-1, -1, -1, states.shape[-1]))

    query, key, mask = call.query, call.key, call.mask
    batch, heads, q_len, _ = query.shape
    per_head = index.repeat_interleave(heads // key.shape[1], dim=1)[:, :, None, :]  # [batch, heads, 1, n]
    if mask is not None:
        if mask.dim() != 4:
            raise NotImplementedError("reading a subset of the keys needs a 4D attention mask (sdpa or eager)")
        mask = mask.expand(batch, heads, q_len, -1).gather(-1, per_head.expand(-1, -1, q_len, -1))
    elif q_len > 1:
        last = key.shape[-2] - q_len + torch.arange(q_len, device=query.device)  # each query's own position
        mask = torch.zeros(per_head.shape[:2] + (q_len, index.shape[-1]), dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(per_head > last[:, None], torch.finfo(query.dtype).min)
    return call.run(key=gather(key), value=gather(call.value), mask=mask)


def model_function(implementation: str, module: torch.nn.Module) -> Callable:
    if implementation == "eager":
        # eager attention is defined per model family (softcapping, sinks...): use the module's own
        return inspect.getmodule(type(module)).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def with_method(method, layer, fn: Callable) -> Callable:
    """The model's attention function `fn`, taken over by `method`'s own attention where it returns one."""
    def attend(module, query, key, value, mask, **kwargs):
        out = method.attend(layer, AttentionCall(module, query, key, value, mask, kwargs, fn=fn))
        return fn(module, query, key, value, mask, **kwargs) if out is None else out
    return attend


def make_attention(implementation: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = model_function(implementation, module)
        state = forward.current()
        layer = None if state is None else state.layer(module.layer_idx)
        if layer is None:  # no kvsqueeze forward: the model's own attention
            return fn(module, query, key, value, attention_mask, **kwargs)
        if layer.compressible:
            state.queries[module.layer_idx] = query
            if state.method is not None and state.method.has("attention"):
                fn = with_method(state.method, layer, fn)
        return layer.attend(AttentionCall(module, query, key, value, attention_mask, kwargs, implementation, fn))

    return attention


def install(model: PreTrainedModel) -> str:
    """Route the model's attention through kvsqueeze. Returns the implementation it had (to give back with
    `uninstall`). The model computes exactly what it computed before until a kvsqueeze forward runs."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return current[len(PREFIX):]
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
    return current


def uninstall(model: PreTrainedModel, implementation: str | None = None) -> None:
    """Give the model back its own attention implementation (`implementation`, or the one kvsqueeze wraps)."""
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        model.set_attn_implementation(implementation or current[len(PREFIX):])
