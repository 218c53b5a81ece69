"""What a method sees of one attention layer in one forward, and what it may ask of it.

`LayerContext` is the eviction side: the layer's tokens as a dense view (keys, values, which are real),
lengths, the forward's queries and hidden states, and `keep` / `prune_key_channels` / `remember`, which
the cache layer carries out. `ctx.rope` (`Rope`) is the rotary geometry: the inverse rotation, pre-RoPE
queries and keys, the model's rotation at any position. `last_queries_attention` is the attention maths
scorers share. Everything is computed once per layer, lazily.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from .attention import UnsupportedModelError, causal_weights
from .cache import SqueezeCache
from .layer import CacheLayer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`states` [..., dim] rotated as RoPE does, x cos + rotate_half(x) sin on the first `cos.shape[-1]` channels (the
    others as they are), with rotate_half(x) = (-x2, x1) done in place on halves: bitwise the same, without the
    concatenations and their copies."""
    rotary, dim = cos.shape[-1], states.shape[-1]
    half = rotary // 2
    out = states * cos if rotary == dim else torch.cat([states[..., :rotary] * cos, states[..., rotary:]], dim=-1)
    out[..., :half] -= states[..., half:rotary] * sin[..., :half]
    out[..., half:rotary] += states[..., :half] * sin[..., half:]
    return out


@dataclass
class LayerContext:
    """One compressible attention layer in one forward. Shapes: keys/values [batch, kv_heads, stored, head_dim]
    (what the layer holds, the new tokens last); hidden_states [batch, new, hidden]; queries [batch, heads, new,
    head_dim]."""

    module: nn.Module
    cache: SqueezeCache
    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    attention_weights: torch.Tensor | None = None
    observed_queries: torch.Tensor | None = field(default=None, repr=False)
    rotary_embedding: nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        self._view: tuple | None = None
        self._as_left = (self.layer, getattr(self.layer, "keys", None))  # the layer as this forward left it

    def for_cache(self, cache: SqueezeCache) -> "LayerContext":
        """The same layer of the same forward, in another cache holding a copy of it (one branch of a shared prefill)."""
        return type(self)(self.module, cache, self.hidden_states, self.position_embeddings, self.attention_weights,
                          self.observed_queries, self.rotary_embedding)

    @property
    def untouched(self) -> bool:
        """Whether the layer still holds what this forward left in it: no method of a chain has compressed it yet
        (a compression replaces the layer or its key tensor, never edits it)."""
        layer, keys = self._as_left
        return self.layer is layer and getattr(layer, "keys", None) is keys

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def layer(self) -> CacheLayer:
        return self.cache.layers[self.layer_idx]

    @property
    def config(self):
        return self.module.config.get_text_config()

    @cached_property
    def depth(self) -> tuple[int, int]:
        """(rank of this layer among the compressible layers, how many there are): what layer schedules use."""
        compressible = self.cache.compressible
        return compressible.index(self.layer_idx), len(compressible)

    # -- what the method asks of the layer --

    def keep(self, mask: torch.Tensor, rows: torch.Tensor | None = None, keys: torch.Tensor | None = None,
             values: torch.Tensor | None = None) -> None:
        """Keep the stored tokens where `mask` [batch, kv_heads, stored] is True; the cache frees the others. With
        `rows` [batch], only those rows change; the others keep all their real tokens. With `keys` / `values` (as
        `keys`), the kept tokens take these contents (merged or re-rotated ones)."""
        self.cache.keep(self.layer_idx, self.in_rows(mask, rows), keys, values)

    def in_rows(self, mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """`mask` [batch, kv_heads, stored] in the `rows` [batch] given (None: all), every real token elsewhere."""
        if rows is None or bool(rows.all()):
            return mask
        unchanged = torch.ones_like(mask) if self.real is None else self.real
        return torch.where(rows.to(mask.device)[:, None, None], mask, unchanged)

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        """Keep only `channels` [batch, kv_heads, kept_dim] of the stored keys."""
        self.cache.prune_key_channels(self.layer_idx, channels)

    def remember(self, name: str, per_token: torch.Tensor) -> None:
        """Keep per-token values [batch, kv_heads, stored] across forwards (they follow the tokens on eviction)."""
        self.layer.remember(name, per_token)

    def recall(self, name: str) -> torch.Tensor | None:
        """What `remember` kept under `name`, for the tokens the layer holds before this forward's, if anything."""
        return self.layer.recall(name)

    # -- the layer's tokens --

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(keys, values, real) of what the layer holds now (see `CompressibleLayer.dense_view`): a head-wise layer
        is shown padded to its longest head; a batch of contexts of different lengths holds left padding until
        its first compression."""
        layer = self.layer
        if self._view is None or self._view[0] is not layer or self._view[1] is not getattr(layer, "keys", None):
            self._view = (layer, getattr(layer, "keys", None), layer.dense_view())
        return self._view[2]

    @property
    def keys(self) -> torch.Tensor:
        return self.view()[0]

    @property
    def values(self) -> torch.Tensor:
        return self.view()[1]

    @property
    def real(self) -> torch.Tensor | None:
        return self.view()[2]

    @property
    def n_stored(self) -> int:
        return self.keys.shape[-2]

    @property
    def row_lengths(self) -> torch.Tensor:
        """Real tokens the layer has seen per batch row (its logical length, padding left out): [batch]."""
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
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.config.num_attention_heads // self.config.num_key_value_heads

    @property
    def scaling(self) -> float:
        """The attention module's softmax scale (Gemma's is not head_dim ** -0.5): read, never guessed."""
        scaling = getattr(self.module, "scaling", None)
        if not isinstance(scaling, float):
            raise UnsupportedModelError(f"{type(self.module).__name__} has no float `scaling`, which the methods that "
                                        "compute attention read")
        return scaling

    @property
    def queries(self) -> torch.Tensor:
        """Queries of the new tokens as attention saw them (after RoPE and any query norm)."""
        if self.observed_queries is None:
            raise RuntimeError("the queries of this layer were not observed: its attention did not run through "
                               "kvsqueeze's attention function")
        return self.observed_queries

    def per_kv_head(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """Average a [batch, heads, ...] tensor over the query heads that share each KV head."""
        batch, heads = per_query_head.shape[:2]
        return per_query_head.view(batch, self.n_kv_heads, heads // self.n_kv_heads, *per_query_head.shape[2:]).mean(2)

    @cached_property
    def rope(self) -> "Rope":
        return Rope(self)


def last_queries_attention(ctx: LayerContext, n: int) -> torch.Tensor:
    """Attention probabilities of the last `n` new queries over all stored keys: [batch, heads, n, stored]; query i
    of the window sees the stored keys up to its own position, padding none."""
    return causal_weights(ctx.queries[:, :, -n:], ctx.keys, ctx.real, ctx.scaling)


class Rope:
    """The rotary geometry of a layer in a forward: undo it, or get the model's rotation at any position."""

    def __init__(self, ctx: LayerContext):
        # a proxy: the context holds its Rope, and a cycle would keep every layer's queries and states alive
        # until Python's cycle collector ran (hundreds of MiB over a prefill)
        self.ctx = weakref.proxy(ctx)

    def unrotate(self, states: torch.Tensor, tokens: slice = slice(None)) -> torch.Tensor:
        """`states` [batch, heads, new, dim] of this forward's tokens (or of those in `tokens`) before the rotary
        embedding (its inverse)."""
        if self.ctx.position_embeddings is None:
            raise RuntimeError(f"{type(self.ctx.module).__name__} gets no rotary position embeddings from its caller")
        cos, sin = (t[:, tokens].unsqueeze(1).to(states.dtype) for t in self.ctx.position_embeddings)
        return rotate(states, cos, -sin)  # x cos - rotate_half(x) sin

    @cached_property
    def queries(self) -> torch.Tensor:
        """This forward's queries before the rotary embedding (the inverse rotation of `ctx.queries`)."""
        return self.unrotate(self.ctx.queries)

    @property
    def keys(self) -> torch.Tensor:
        """Keys of this forward's tokens (the last `n_new` stored) before the rotary embedding."""
        if not self.ctx.untouched:
            raise RuntimeError("the pre-RoPE keys of this forward's tokens are unknown once an earlier method of a "
                               "chain has compressed the layer: put the method that needs them first")
        return self._keys

    @cached_property
    def _keys(self) -> torch.Tensor:
        return self.unrotate(self.ctx.keys[..., -self.ctx.n_new:, :])

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's rotary (cos, sin) for logical `positions` (e.g. future ones), each [1, len(positions), rotary_dim]."""
        ctx = self.ctx
        if ctx.rotary_embedding is None:
            raise RuntimeError(f"no rotary embedding module was found in the model of {type(ctx.module).__name__}")
        kwargs = {}
        if "layer_type" in inspect.signature(ctx.rotary_embedding.forward).parameters:
            kwargs["layer_type"] = ctx.config.layer_types[ctx.layer_idx]
        return ctx.rotary_embedding(ctx.queries, position_ids=positions[None].to(ctx.queries.device), **kwargs)
