"""The attention function kvsqueeze routes a model through, registered with transformers' `AttentionInterface`.

It delegates to the model's own implementation (sdpa, eager, flash) and fixes one thing: transformers
builds one attention mask per forward, sized from one layer of the cache. After compression the layers
may hold different numbers of tokens (PyramidKV, skipped layers), so each layer gets its own mask:
every stored token is visible, and the new tokens keep the causal (and padding) pattern transformers
built for them, which is the same in every layer. With nothing compressed it passes the mask through
untouched, so the model is reproduced exactly.

It also lets a method observe the queries of a layer (after RoPE and any query norm, exactly as the
model computed them), which is how scorers see queries without knowing each model family's code, and lets
a method take over a layer's attention for a forward (`attention_overrides`): read only some stored keys
(`attend_to`, Quest) or compute a sparse prefill (MInference).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "kvsqueeze_"

# Per attention module, the callbacks that want its queries during the current forward.
query_observers: dict[torch.nn.Module, Callable[[torch.Tensor], None]] = {}

# Per attention module, a method's own attention for a dense kvsqueeze layer (e.g. reading only some stored keys,
# or a sparse prefill): `fn(module, query, key, value, mask, attend, **kwargs)` gets the layer's own mask and
# `attend`, the model's attention function; it returns the attention output, or None for the model's own attention.
attention_overrides: dict[torch.nn.Module, Callable] = {}


def allowed_columns(mask: torch.Tensor | None, fresh: int) -> torch.Tensor | None:
    """Which of the layer's `fresh` most recent tokens each query may see, as a bool [batch, 1, q or 1, fresh].

    Read from the mask transformers built (its last columns are the most recent tokens): bool (sdpa),
    additive float (eager) or 2D padding (flash). None when there is no mask (no padding).
    """
    if mask is None:
        return None
    columns = mask[..., -fresh:]
    if mask.dim() == 2:
        return columns.bool()[:, None, None, :]
    if columns.dtype != torch.bool:
        return columns > torch.finfo(columns.dtype).min / 2
    return columns


def layer_mask(mask: torch.Tensor | None, query: torch.Tensor, kv_len: int, fresh: int, base: str):
    """This layer's mask: its kept older tokens all visible, its `fresh` most recent ones as transformers masked them.

    With nothing compressed (every stored token fresh) transformers' mask is returned untouched.
    """
    q_len = query.shape[-2]
    if mask is None:
        if q_len == 1 or q_len == kv_len or base.startswith("flash"):
            return None  # sdpa and flash handle these cases without a mask
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[None, None]
        if base == "eager":
            return torch.zeros(causal.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~causal, torch.finfo(query.dtype).min)
        return causal
    if fresh == kv_len and mask.shape[-1] == kv_len:
        return mask
    visible = torch.ones if mask.dtype == torch.bool or mask.dim() == 2 else torch.zeros
    kept = visible(*mask.shape[:-1], kv_len - fresh, dtype=mask.dtype, device=mask.device)
    return torch.cat([kept.expand(*mask.shape[:-1], -1), mask[..., -fresh:]], dim=-1)


def ragged_attention(layer, query: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of `query` [batch, heads, q, dim] over a RaggedLayer's pages and dense tail; [batch, q, heads, dim].

    Each KV head's segment is attended by the query heads of its group. Pages give batched matrix
    products; a segment's softmax is assembled from per-page maxima and sums (segment-wise softmax),
    then merged with the tail's, where the new tokens are causal among themselves and `allowed`
    ([batch, 1, q or 1, tail], from the model's mask) hides padding.
    """
    batch, n_heads, q_len, dim = query.shape
    segments = batch * layer.heads
    rows = n_heads // layer.heads * q_len  # query rows per segment: the group's heads x new tokens
    queries = query.reshape(segments, rows, dim)

    tail_k, tail_v = layer.tail_k.reshape(segments, -1, dim), layer.tail_v.reshape(segments, -1, layer.tail_v.shape[-1])
    logits = torch.bmm(queries, tail_k.transpose(1, 2)).float() * scaling
    tail_len = tail_k.shape[1]
    new_token = torch.arange(rows, device=query.device) % q_len
    future = torch.arange(tail_len, device=query.device)[None, :] > (tail_len - q_len + new_token)[:, None]
    logits = logits.masked_fill(future, float("-inf"))
    if allowed is not None:
        group = n_heads // layer.heads
        allowed = allowed[:, 0][:, None, None].expand(batch, layer.heads, group, q_len, tail_len)
        logits = logits.masked_fill(~allowed.reshape(segments, rows, tail_len), float("-inf"))
    top = logits.amax(-1).clamp(min=torch.finfo(logits.dtype).min)  # a padding query may see nothing at all
    weights = (logits - top[..., None]).exp()
    total = weights.sum(-1)
    out = torch.bmm(weights.to(tail_v.dtype), tail_v).float()

    if layer.n_pages:
        pages_k, pages_v = layer.page_data()
        segment = layer.page_segment
        if layer.key_channels is not None:  # ThinK: the keys kept only some channels; so do the queries
            channels = layer.key_channels[:, None, :].expand(-1, rows, -1)
            queries = queries.gather(-1, channels)
        page_logits = torch.bmm(queries[segment], pages_k.transpose(1, 2)).float() * scaling
        empty = torch.arange(layer.page_size, device=query.device)[None, :] >= layer.page_fill[:, None]
        page_logits = page_logits.masked_fill(empty[:, None, :], float("-inf"))
        page_top = page_logits.amax(-1)  # [pages, rows]
        top_all = top.scatter_reduce(0, segment[:, None].expand(-1, rows), page_top, "amax")
        page_weights = (page_logits - top_all[segment][..., None]).exp()
        page_out = torch.bmm(page_weights.to(pages_v.dtype), pages_v).float()
        rescale = (top - top_all).exp()
        total = total * rescale + torch.zeros_like(total).index_add_(0, segment, page_weights.sum(-1))
        out = out * rescale[..., None] + torch.zeros_like(out).index_add_(0, segment, page_out)

    out = (out / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]).to(query.dtype)  # nothing visible: 0
    return out.view(batch, n_heads, q_len, -1).transpose(1, 2).contiguous()


@contextmanager
def overridden(modules: list[torch.nn.Module], fn: Callable):
    """While the block runs, `fn` may take over the attention of `modules` (see `attention_overrides`)."""
    attention_overrides.update(dict.fromkeys(modules, fn))
    try:
        yield
    finally:
        for module in modules:
            attention_overrides.pop(module, None)


def attend_to(attend: Callable, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None, index: torch.Tensor, **kwargs):
    """The model's attention function `attend`, reading only the stored tokens at `index` [batch, kv_heads, n]
    (positions in `key`, each KV head its own, in increasing order): the other keys and values are never read.

    The mask's columns follow the kept tokens; without a mask, a multi-token query stays causal.
    """
    def gather(states):
        return states.gather(2, index[..., None].expand(-1, -1, -1, states.shape[-1]))

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
    return attend(module, query, gather(key), gather(value), mask, **kwargs)


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
        layer = getattr(key, "kvsqueeze_layer", None)
        if layer is None:  # not a kvsqueeze layer (a sliding window, another cache): the model's own attention
            return base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        allowed = allowed_columns(attention_mask, layer.fresh)
        layer.observe(None if allowed is None else allowed[:, 0, -1, :], query.shape[-2])
        if hasattr(layer, "pages_k"):  # a ragged layer
            if layer.fresh_valid is not None:  # what the layer knows to be padding, besides the mask
                real = layer.fresh_valid.to(query.device)[:, None, None, :]
                allowed = real if allowed is None else allowed & real
            if kwargs.get("softcap") is not None:
                raise NotImplementedError("attention softcapping is not supported on head-wise (ragged) layers")
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            return ragged_attention(layer, query, scaling, allowed), None
        attention_mask = layer_mask(attention_mask, query, key.shape[-2], layer.fresh, base)
        attend = base_function(base, module)
        override = attention_overrides.get(module)
        if override is not None:
            out = override(module, query, key, value, attention_mask, attend, **kwargs)
            if out is not None:
                return out
        return attend(module, query, key, value, attention_mask, **kwargs)

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
