"""Forward hooks on a model's attention modules, and the per-layer context handed to a method.

`with method.apply(model):` registers, for every attention module, a forward hook (with kwargs) that
runs once the module has attended and updated its cache layer; the method then decides what the
layer keeps. Nothing in the model's code is patched: the hooks are removed on exit.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import transformers
from torch import nn
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import BaseQuantizedLayer

from . import attention, forward
from .cache import CompressibleLayer, EvictingLayer, SqueezeCache, as_squeeze_cache, layer_types, quantizer_like
from .forward import CompressionNotAppliedError, Forward
from .ragged import RaggedLayer

if TYPE_CHECKING:
    from .methods.base import Method


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules, in layer order. Raises if none can be hooked."""
    found = {}
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "layer_idx", None), int):
            found.setdefault(module.layer_idx, module)
    if not found:
        raise attention.UnsupportedModelError(
            f"{type(model).__name__} has no attention modules kvsqueeze can hook (modules named *Attention "
            "with a layer_idx, as in transformers' decoder-only models)")
    return [found[i] for i in sorted(found)]


def rotary_embedding(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class LayerContext:
    """What a method may use about one attention layer in one forward. Derived values are computed once, lazily.

    Shapes: keys/values [batch, kv_heads, stored, head_dim] (what the layer holds, the new tokens last);
    hidden_states [batch, new, hidden]; queries [batch, heads, new, head_dim].
    """

    module: nn.Module
    cache: SqueezeCache
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_weights: torch.Tensor | None = None
    captured_queries: torch.Tensor | None = field(default=None, repr=False)
    rotary_embedding: nn.Module | None = field(default=None, repr=False)
    _view: tuple | None = field(default=None, repr=False)
    _as_left: tuple | None = field(default=None, repr=False)  # (layer, its keys) as this forward left them

    def __post_init__(self):
        if self._as_left is None:
            self._as_left = (self.layer, getattr(self.layer, "keys", None))

    @property
    def untouched(self) -> bool:
        """Whether the layer still holds what this forward left in it: no method of a chain has compressed it yet
        (a ragged layer is replaced, never edited; a dense one gets new key tensors)."""
        layer, keys = self._as_left
        return self.layer is layer and getattr(layer, "keys", None) is keys

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def layer(self) -> EvictingLayer:
        return self.cache.layers[self.layer_idx]

    def keep(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Keep the stored tokens where `mask` [batch, kv_heads, stored] is True; the cache frees the others.

        With `rows` [batch], only those rows change; the others keep all their real tokens."""
        self.cache.keep(self.layer_idx, self.in_rows(mask, rows))

    def in_rows(self, mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`mask` [batch, kv_heads, stored] in the `rows` [batch] given (None: all), every real token elsewhere."""
        if rows is None or bool(rows.all()):
            return mask
        unchanged = torch.ones_like(mask) if self.real is None else self.real
        return torch.where(rows.to(mask.device)[:, None, None], mask, unchanged)

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Keep only `channels` [batch, kv_heads, kept_dim] of the stored keys."""
        self.cache.prune_key_channels(self.layer_idx, channels)

    @property
    def config(self):
        return self.module.config.get_text_config()

    @cached_property
    def depth(self) -> tuple[int, int]:
        """(rank of this layer among the compressible layers, how many there are): what layer schedules use."""
        compressible = [i for i, kind in enumerate(layer_types(self.config)) if kind == "full_attention"]
        return compressible.index(self.layer_idx), len(compressible)

    def stored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(keys, values, real) of what the layer holds now; `real` [batch, kv_heads, stored] marks real tokens
        (None: all are). A ragged layer is shown padded to its longest head; a batch of contexts of different
        lengths holds left padding until its first compression."""
        layer = self.layer
        if isinstance(layer, RaggedLayer):
            if self._view is None or self._view[0] is not layer:  # a ragged layer is replaced, never edited
                self._view = (layer, layer.dense_view())
            return self._view[1]
        return layer.keys, layer.values, None if layer.fresh_valid is None else layer.real_mask()

    @property
    def keys(self) -> torch.Tensor:
        return self.stored()[0]

    @property
    def values(self) -> torch.Tensor:
        return self.stored()[1]

    @property
    def real(self) -> torch.Tensor | None:
        return self.stored()[2]

    @property
    def n_stored(self) -> int:
        return self.keys.shape[-2]

    @property
    def seen(self) -> torch.Tensor:
        """Real tokens the layer has seen (its logical length, padding left out), per batch row: [batch]."""
        return self.layer.row_lengths(self.keys.shape[0])

    @property
    def rank(self) -> torch.Tensor:
        """Position of each stored token among the real ones of its (row, head), 0 for the oldest kept; padding -1."""
        if self.real is None:
            return torch.arange(self.n_stored, device=self.keys.device).expand(self.keys.shape[:3])
        return torch.where(self.real, self.real.long().cumsum(-1) - 1, -1)

    @property
    def new_real(self) -> torch.Tensor | None:
        """[batch, new]: which of this forward's tokens are real (None: all), e.g. to leave padding queries out."""
        valid = self.layer.fresh_valid
        return None if valid is None else valid[:, -self.n_new:]

    @property
    def held(self) -> torch.Tensor:
        """Tokens each (batch row, KV head) holds now: [batch, kv_heads]."""
        if self.real is None:
            return torch.full(self.keys.shape[:2], self.n_stored, dtype=torch.long, device=self.keys.device)
        return self.real.sum(-1)

    @property
    def n_new(self) -> int:
        return self.hidden_states.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def scaling(self) -> float:
        return getattr(self.module, "scaling", self.head_dim ** -0.5)

    @property
    def queries(self) -> torch.Tensor:
        """Queries of the new tokens as attention saw them (after RoPE and any query norm)."""
        if self.captured_queries is None:
            raise RuntimeError("the queries of this layer were not observed: is the model's attention routed "
                               "through kvsqueeze (kvsqueeze.attention.install)?")
        return self.captured_queries

    def unrotate(self, states: torch.Tensor) -> torch.Tensor:
        """`states` [batch, heads, new, dim] of this forward's tokens before the rotary embedding (its inverse)."""
        if self.position_embeddings is None:
            raise RuntimeError(f"{type(self.module).__name__} gets no rotary position embeddings from its caller")
        cos, sin = (t.unsqueeze(1).to(states.dtype) for t in self.position_embeddings)
        rotary = cos.shape[-1]
        rotated, passed = states[..., :rotary], states[..., rotary:]
        return torch.cat([rotated * cos - rotate_half(rotated) * sin, passed], dim=-1)

    @cached_property
    def pre_rope_queries(self) -> torch.Tensor:
        """Queries before the rotary embedding (the inverse rotation of `queries`)."""
        return self.unrotate(self.queries)

    @property
    def pre_rope_keys(self) -> torch.Tensor:
        """Keys of this forward's tokens (the last `n_new` stored) before the rotary embedding."""
        if not self.untouched:
            raise RuntimeError("the pre-RoPE keys of this forward's tokens are unknown once an earlier method of a "
                               "chain has compressed the layer: put the method that needs them first")
        return self._pre_rope_keys

    @cached_property
    def _pre_rope_keys(self) -> torch.Tensor:
        return self.unrotate(self.keys[..., -self.n_new:, :])

    def rotary_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary (cos, sin) for logical `positions` (e.g. future ones), each [1, len(positions), rotary_dim]."""
        if self.rotary_embedding is None:
            raise RuntimeError(f"no rotary embedding module was found in the model of {type(self.module).__name__}")
        kwargs = {}
        if "layer_type" in inspect.signature(self.rotary_embedding.forward).parameters:
            kwargs["layer_type"] = self.config.layer_types[self.layer_idx]
        return self.rotary_embedding(self.queries, position_ids=positions[None].to(self.queries.device), **kwargs)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.config.num_attention_heads // self.config.num_key_value_heads

    def last_queries_attention(self, n: int) -> torch.Tensor:
        """Attention probabilities of the last `n` new queries over all stored keys: [batch, heads, n, stored].

        Causal: query i of the window sees the stored keys up to its own position.
        """
        queries = self.queries[:, :, -n:]
        keys = self.keys.repeat_interleave(self.group_size, dim=1)
        logits = torch.matmul(queries, keys.transpose(-1, -2)).float() * self.scaling
        future = torch.ones(n, n, dtype=torch.bool, device=logits.device).triu(1)
        logits[..., -n:] = logits[..., -n:].masked_fill(future, float("-inf"))
        if self.real is not None:  # a ragged layer's padding is no token
            logits = logits.masked_fill(~self.real.repeat_interleave(self.group_size, 1)[:, :, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def per_kv_head(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """Average a [batch, heads, ...] tensor over the query heads that share each KV head."""
        batch, heads = per_query_head.shape[:2]
        return per_query_head.view(batch, self.n_kv_heads, heads // self.n_kv_heads, *per_query_head.shape[2:]).mean(2)


CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 names it `cache`, before `past_key_values`


def cache_argument(model: nn.Module) -> str:
    """The keyword under which the installed transformers' `model` takes its cache (`cache` from 5.24 on)."""
    decoder = getattr(model, "base_model", model)
    parameters = inspect.signature(decoder.forward).parameters
    found = next((name for name in CACHE_ARGUMENTS if name in parameters), None)
    if found is None:
        raise attention.UnsupportedModelError(
            f"{type(decoder).__name__}.forward takes its cache under none of {CACHE_ARGUMENTS} "
            f"(transformers {transformers.__version__}): kvsqueeze cannot hand it a cache")
    return found


def _forward_hooks(model: nn.Module, method: "Method"):
    """A pre-hook and a hook on the model's forward. The pre-hook gives the forward a SqueezeCache when it was called
    with none, with an empty default cache, or with a transformers quantized cache (whose quantization the
    SqueezeCache takes over, see `cache.as_squeeze_cache`), starts the forward's `Forward` state, and lets the method
    see the forward's arguments. The hook ends the state and raises if the method missed a layer it compresses."""
    name = cache_argument(model)

    def pre_hook(module, args, kwargs):
        given = [kwargs.pop(alias) for alias in CACHE_ARGUMENTS if kwargs.get(alias) is not None]
        cache = given[0] if given else None
        if kwargs.get("use_cache") is not False and not isinstance(cache, SqueezeCache):
            if cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
                cache = SqueezeCache(model.config)
            elif isinstance(cache, QuantizedCache):
                cache = quantized_squeeze_cache(model, cache)
            else:
                raise TypeError(f"kvsqueeze methods compress a SqueezeCache; got a filled {type(cache).__name__}")
        state = None
        if cache is not None:
            kwargs[name] = cache
            state = forward.begin(Forward(cache, method))
        try:
            method.before_forward(kwargs)
        except BaseException:
            if state is not None:
                forward.end(state)
            raise
        return args, kwargs

    def hook(module, args, kwargs, output):
        state = forward.current()
        if state is None or state.method is not method:
            return
        forward.end(state)
        missed = state.unreached()
        if output is not None and missed:
            raise CompressionNotAppliedError(
                f"{type(method).__name__} was applied but did not reach layers {missed} of "
                f"{type(model).__name__} (transformers {transformers.__version__}): nothing was compressed there. "
                "This transformers release may route attention differently from the releases kvsqueeze supports.")

    return pre_hook, hook


def quantized_squeeze_cache(model: nn.Module, cache: QuantizedCache) -> SqueezeCache:
    """The SqueezeCache that takes over a transformers quantized cache: its tokens, stored at its bits."""
    if cache.get_seq_length():
        return as_squeeze_cache(cache)  # quantized again layer by layer, after each attends
    quantized = next(layer for layer in cache.layers if isinstance(layer, BaseQuantizedLayer))
    return SqueezeCache(model.config, quantizer=quantizer_like(quantized))


@contextmanager
def hooked(model: nn.Module, method: "Method"):
    """Run `method` after every attention layer of `model` while the context is open (and its own attention, if it
    has one, in place of the model's)."""
    modules = attention_modules(model)
    attention.install(model)
    rotary = rotary_embedding(model)
    captured: dict[nn.Module, torch.Tensor] = {}

    def after_attention(module, args, kwargs, output):
        query = captured.pop(module, None)
        state = forward.current()
        if state is None or state.method is not method:
            return
        cache, index = state.cache, module.layer_idx
        layer = cache.layers[index]
        if not isinstance(layer, CompressibleLayer) or not layer.is_initialized:
            return  # sliding-window layers are bounded by the model itself
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, torch.Tensor):
            raise attention.UnsupportedModelError(
                f"{type(module).__name__} got no hidden states as its first argument (transformers "
                f"{transformers.__version__}): kvsqueeze cannot hand them to {type(method).__name__}")
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        ctx = LayerContext(module=module, cache=cache, hidden_states=hidden,
                           position_embeddings=kwargs.get("position_embeddings"),
                           attention_weights=weights, captured_queries=query, rotary_embedding=rotary)
        if method.acts_on(ctx):
            with torch.no_grad():
                method.compress(ctx)
        cache.quantize(index)
        state.reached.add(index)

    decoder = getattr(model, "base_model", model)  # model(...), generate and kvsqueeze's prefill all go through it
    pre_hook, hook = _forward_hooks(model, method)
    handles = [decoder.register_forward_pre_hook(pre_hook, with_kwargs=True),
               decoder.register_forward_hook(hook, with_kwargs=True, always_call=True)]
    for module in modules:
        handles.append(module.register_forward_hook(after_attention, with_kwargs=True))
        attention.query_observers[module] = lambda query, module=module: captured.__setitem__(module, query)
    overrides = attention.overridden(modules, method.attend) if method.overrides_attention() else nullcontext()
    try:
        with overrides:
            yield method
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            attention.query_observers.pop(module, None)
