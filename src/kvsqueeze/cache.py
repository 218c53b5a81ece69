"""A `transformers.Cache` whose layers really shrink when a method evicts tokens.

Each layer counts two lengths:

- the *logical* length (`get_seq_length()`): tokens the model has seen. Positions of new tokens come
  from it, so generation continues where the context ended, however much was evicted;
- the *physical* length (`stored`): tokens held in memory. Masks are sized from it
  (`get_mask_sizes()` returns the stored length plus the query, offset so that stored tokens are all
  visible and the new tokens are causal among themselves).

What a layer holds is never modified in place: every eviction makes new tensors, and a decoded token is
written after the tokens (into a `Room`) where no other layer sees it. That is what lets `fork()` hand out a
copy that shares all memory with the original and still leaves it untouched, which is how a compressed
context is restored exactly between questions.
"""

from __future__ import annotations

import copy
import threading

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from . import forward
from .attention import layer_mask
from .layer import CacheLayer, CompressibleLayer
from .ragged import RaggedLayer, page_size_for


class UnreadCacheError(RuntimeError):
    """A model ran on a SqueezeCache without reading it through kvsqueeze (its masks and ragged layers)."""


class Room:
    """Keys and values with room after their tokens, so that a layer decoding one token at a time writes each token
    in place instead of copying all it holds at every step (transformers' `DynamicLayer` concatenates: at 8,000
    tokens that copy was a quarter of a decoding step on the bundled model).

    Forks share it and the memory it holds stays what each saw: a layer writes in place only where nobody wrote
    before (`claim`), so the first fork to go on writes after the shared tokens and any other copies first."""

    SPARE = 256  # tokens of room made at a time

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, tokens: int):
        """A copy of `keys` and `values` with the room for `tokens` more claimed, and SPARE after them."""
        stored = keys.shape[-2]
        self.keys = keys.new_empty(*keys.shape[:-2], stored + tokens + self.SPARE, keys.shape[-1])
        self.values = values.new_empty(*values.shape[:-2], stored + tokens + self.SPARE, values.shape[-1])
        self.keys[..., :stored, :], self.values[..., :stored, :] = keys, values
        self.filled = stored + tokens
        self.lock = threading.Lock()

    def holds(self, keys: torch.Tensor) -> bool:
        """Whether `keys` are the first tokens of this room's (what a layer that wrote here still holds)."""
        return keys.data_ptr() == self.keys.data_ptr() and keys.stride() == self.keys.stride()

    def claim(self, start: int, tokens: int) -> bool:
        """Take the room for `tokens` more after the first `start`: only if nobody wrote past `start` and they fit."""
        with self.lock:
            if self.filled != start or start + tokens > self.keys.shape[-2]:
                return False
            self.filled = start + tokens
            return True

    def append(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write after the first `start` tokens (claimed); the views of everything up to them."""
        end = start + keys.shape[-2]
        self.keys[..., start:end, :], self.values[..., start:end, :] = keys, values
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class EvictingLayer(CompressibleLayer, DynamicLayer):
    """Dense layer: every (batch row, KV head) keeps the same number of tokens, in their original order."""

    kind = "evicting"
    saved_tensors = ("keys", "values", "fresh_valid", "pads")
    saved_numbers = ("peak_bytes", "seen", "fresh")
    room: Room | None = None  # where decoded tokens are written (see `Room`)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys

    @keys.setter
    def keys(self, keys: torch.Tensor | None) -> None:
        self._keys = keys
        if self.room is not None and (keys is None or not self.room.holds(keys)):
            self.room = None  # keys replaced (evicted, reordered, a question appended): the room is freed with them

    def __init__(self, quantizer=None, **kwargs):
        super().__init__()
        self.quantizer = quantizer  # what this layer keeps is stored quantized (in a RaggedLayer's pages)
        self.seen = 0
        self.fresh = 0
        self.token_state: dict[str, torch.Tensor] = {}

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        self.fresh += key_states.shape[-2]
        if key_states.shape[-2] != 1 or not self.stored:  # the prefill, its chunks, a question: copied once
            return super().update(key_states, value_states)
        stored, room = self.stored, self.room
        if room is None or not room.holds(self.keys) or not room.claim(stored, 1):
            room = self.room = Room(self.keys, self.values, 1)
        self.keys, self.values = room.append(stored, key_states, value_states)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return self.keys, self.values

    def nbytes(self) -> int:
        """What the layer holds, the room after its tokens included."""
        if self.room is not None and self.is_initialized and self.room.holds(self.keys):
            return self.room.nbytes
        return super().nbytes()

    def attend(self, call):
        """The model's attention over the stored tokens, with this layer's own mask: its kept older tokens all
        visible, its fresh ones as transformers masked them."""
        self.observe(call.mask, call.query.shape[-2])
        return call.run(mask=layer_mask(call.mask, call.query, call.key.shape[-2], self.fresh, call.implementation))

    def to_saved(self):
        tensors, numbers = super().to_saved()
        return tensors | {f"state.{name}": values for name, values in self.token_state.items()}, numbers

    @classmethod
    def from_saved(cls, tensors, numbers):
        layer = super().from_saved(tensors, numbers)
        layer.token_state = {name[len("state."):]: values for name, values in tensors.items()
                             if name.startswith("state.")}
        return layer

    def restart_positions(self) -> None:
        """Positions now follow the cache: the logical length becomes the stored one (keys the method re-rotated
        to positions 0..stored-1; rolling StreamingLLM)."""
        self.seen, self.fresh = self.stored, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.fresh + query_length, self.seen - self.fresh

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.fresh_valid is not None:
            self.fresh_valid = self.fresh_valid[index.to(self.fresh_valid.device)]
        if self.pads is not None:
            self.pads = self.pads[index.to(self.pads.device)]
        self.token_state = {name: values[index.to(values.device)] for name, values in self.token_state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        rows = self.keys.shape[0] if self.is_initialized and self.keys.numel() else 0
        super().batch_repeat_interleave(repeats)
        self._select_rows(torch.arange(rows).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_rows(indices)

    def dense_view(self):
        return self.keys, self.values, None if self.fresh_valid is None else self.real_mask()

    def keep(self, mask, keys=None, values=None):
        """This layer when every (batch row, head) keeps the same number of tokens, else a RaggedLayer, where each
        head keeps its own number; a RaggedLayer too when the layer has a quantizer, whose pages are stored
        quantized."""
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        counts = mask.sum(-1)
        n_keep = int(counts.flatten()[0])
        if not bool((counts == n_keep).all()) or self.quantizer is not None:
            return RaggedLayer.from_dense(keys, values, mask, self.seen, quantizer=self.quantizer).inherit(self)
        self.fresh, self.fresh_valid = 0, None  # padding is never kept: all stored tokens are real from now on
        if n_keep < self.stored:
            batch, heads, _ = mask.shape
            index = mask.nonzero()[:, -1].view(batch, heads, n_keep)
            self.token_state = {name: values.gather(2, index) for name, values in self.token_state.items()
                                if values.shape[-1] == self.stored}
            index = index[..., None]
            keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
            values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        self.keys, self.values = keys, values
        return self

    def prune_key_channels(self, channels):
        return RaggedLayer.from_dense(self.keys, self.values, self.real_mask(), self.seen, key_channels=channels,
                                      quantizer=self.quantizer).inherit(self)

    def quantized(self) -> CacheLayer:
        return self.keep(self.real_mask()) if self.quantizer is not None and self.stored else self

    def as_ragged(self, page_size: int | None = None) -> CacheLayer:
        """The RaggedLayer holding this layer's real tokens (quantized, with a quantizer)."""
        return RaggedLayer.from_dense(self.keys, self.values, self.real_mask(), self.seen, page_size,
                                      quantizer=self.quantizer).inherit(self)

    @property
    def mergeable(self) -> bool:
        """Whether MiniCache may merge this layer with another: dense, full precision, no padding, never compressed."""
        return self.quantizer is None and self.fresh_valid is None and self.fresh == self.stored

    def real_mask(self) -> torch.Tensor:
        """[batch, kv_heads, stored]: the stored tokens that are real (not padding)."""
        batch, heads, stored, _ = self.keys.shape
        kept = torch.ones(batch, heads, stored - self.fresh, dtype=torch.bool, device=self.keys.device)
        return torch.cat([kept, self.fresh_real(batch, heads, self.keys.device)], dim=-1)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        removable = min(-tokens_to_remove, self.fresh)
        super().crop(-removable)
        self.seen -= removable
        self.fresh -= removable
        if self.fresh_valid is not None:
            self.fresh_valid = self.fresh_valid[:, : self.fresh]

    def reset(self) -> None:
        super().reset()
        self.seen = self.fresh = 0
        self.fresh_valid = self.pads = None


class SlidingWindowLayer(CacheLayer, DynamicSlidingWindowLayer):
    """The model's own sliding-window layer. It is already bounded by its window, so methods leave it alone."""

    kind = "sliding"
    saved_numbers = ("peak_bytes", "sliding_window", "cumulative_length")


LAYER_TYPES = {"full_attention": EvictingLayer, "sliding_attention": SlidingWindowLayer,
               "chunked_attention": SlidingWindowLayer}


def layer_types(config) -> list[str]:
    config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types is None:
        window = getattr(config, "sliding_window", None)
        types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    return list(types)


def compressible_layers(config) -> list[int]:
    """The layers of a model (by its config) that methods compress: its full-attention layers."""
    return [i for i, kind in enumerate(layer_types(config)) if LAYER_TYPES.get(kind, CacheLayer).compressible]


class SqueezeCache(Cache):
    """The kvsqueeze cache: a list of layers, one per attention layer of the model.

    Built from a model config, full-attention layers are `EvictingLayer`s (methods compress them) and
    sliding-window layers (Gemma 3, Mistral with a window) keep the model's own bounded window. With a
    `quantizer`, what the full-attention layers keep is stored quantized (see `quantize`).
    """

    def __init__(self, config=None, layers: list | None = None, quantizer=None):
        if layers is None and config is not None:
            text_config = config.get_text_config()
            layers = []
            for kind in layer_types(config):
                if kind not in LAYER_TYPES:
                    raise ValueError(f"kvsqueeze cannot cache layers of type {kind!r} (model type "
                                     f"{text_config.model_type!r})")
                if LAYER_TYPES[kind] is SlidingWindowLayer:
                    window = text_config.sliding_window if kind == "sliding_attention" else text_config.attention_chunk_size
                    layers.append(SlidingWindowLayer(sliding_window=window))
                else:
                    layers.append(EvictingLayer(quantizer=quantizer))
        if layers is None:
            super().__init__(layer_class_to_replicate=EvictingLayer)
        else:
            super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        state = forward.current()
        if state is None or state.cache is not self:
            raise UnreadCacheError(
                "a SqueezeCache is read through kvsqueeze's attention (its layers keep different tokens): run the "
                "model inside `with kvsqueeze.attached(model):` or a method's `apply(model)`, or ask the "
                "CompressedContext (generate / ask)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def compressible(self) -> list[int]:
        """The layers methods compress (sliding-window layers are bounded by the model itself)."""
        return [i for i, layer in enumerate(self.layers) if layer.compressible]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Masks cover the most recent tokens, as many as the layer with the most fresh tokens holds.

        transformers builds one mask per forward from these sizes; every compressible layer reads the
        columns of its own fresh tokens from its end (see `attention.py`), so it must be wide enough for all.
        """
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is None or not layer.compressible:
            return super().get_mask_sizes(query_length, layer_idx)
        widest = max(self.layers[i].fresh for i in self.compressible)
        return widest + query_length, layer.seen - widest

    def keep(self, layer_idx: int, mask: torch.Tensor, keys: torch.Tensor | None = None,
             values: torch.Tensor | None = None) -> None:
        """Layer `layer_idx` keeps the tokens where `mask` is True (see `CompressibleLayer.keep`)."""
        self.layers[layer_idx] = self.layers[layer_idx].keep(mask, keys, values)

    def quantize(self, layer_idx: int | None = None) -> None:
        """Store quantized every compressible layer (or layer `layer_idx`) that has a quantizer and still holds
        full-precision tokens. A method's compression quantizes the layers it compresses; this covers the rest
        (quantization alone, layers a method leaves whole)."""
        for i in self.compressible if layer_idx is None else [layer_idx]:
            if self.layers[i].compressible:
                self.layers[i] = self.layers[i].quantized()

    def prune_key_channels(self, layer_idx: int, channels: torch.Tensor) -> None:
        """Layer `layer_idx` keeps only `channels` [batch, kv_heads, kept_dim] of its keys (ThinK)."""
        self.layers[layer_idx] = self.layers[layer_idx].prune_key_channels(channels)

    def fork(self) -> "SqueezeCache":
        """A copy that shares every tensor with this cache; updating it leaves this cache as it is."""
        clone = copy.copy(self)
        clone.layers = [layer.fork() for layer in self.layers]
        return clone

    @classmethod
    def stack(cls, caches: list["SqueezeCache"]) -> "SqueezeCache":
        """The rows of `caches` (of one model) as one batch, to generate for them at once: each compressible layer
        becomes a RaggedLayer holding every row's tokens exactly as it held them (quantized pages are moved, not
        stored again); a context that has seen fewer tokens gets left padding, which is never stored. Raises
        ValueError for what cannot share a batch (sliding-window layers, different quantizers)."""
        if len({len(cache.layers) for cache in caches}) != 1:
            raise ValueError("only caches of one model can share a batch")
        layers = []
        for i, group in enumerate(zip(*(cache.layers for cache in caches))):
            if not all(layer.compressible for layer in group):
                raise ValueError(f"layer {i} is a {type(group[0]).__name__}: contexts of a model with sliding-window "
                                 "layers cannot share a batch")
            ragged = [layer.as_ragged() for layer in group]
            if all(layer.quantizer is None for layer in ragged):
                size = page_size_for(torch.cat([layer.lengths.flatten() for layer in ragged]).float().mean().item())
                ragged = [layer.as_ragged(size) for layer in ragged]
            layers.append(RaggedLayer.stack(ragged))
        return cls(layers=layers)

    def nbytes(self) -> int:
        """Bytes really held by the cache's tensors. A layer's `nbytes()` counts what it holds alone; tensors several
        layers share (listed by a layer's `shared_tensors()`, e.g. MiniCache's merged pairs) are counted once."""
        shared = {(t.data_ptr(), t.nbytes): t.nbytes for layer in self.layers
                  for t in layer.shared_tensors()}
        return sum(layer.nbytes() for layer in self.layers) + sum(shared.values())

    def peak_bytes(self) -> int:
        """The sum over layers of the most bytes each layer held at once (before compression, for a prefill)."""
        return sum(layer.peak_bytes for layer in self.layers)

    def stored_lengths(self) -> list[int]:
        return [layer.stored for layer in self.layers]

    def kept_per_head(self) -> list[torch.Tensor]:
        """Tokens held per layer, as one [batch, kv_heads] tensor per layer."""
        return [layer.kept_per_head() for layer in self.layers]
