"""A `transformers.Cache` whose layers really shrink when a method evicts tokens.

Each layer counts two lengths:

- the *logical* length (`get_seq_length()`): tokens the model has seen. Positions of new tokens come
  from it, so generation continues where the context ended, however much was evicted;
- the *physical* length (`stored`): tokens held in memory. Masks are sized from it
  (`get_mask_sizes()` returns the stored length plus the query, offset so that stored tokens are all
  visible and the new tokens are causal among themselves).

Tensors are never modified in place: every update or eviction makes new tensors. That is what lets
`fork()` hand out a copy that shares all memory with the original and still leaves it untouched,
which is how a compressed context is restored exactly between questions.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer


class MeasuredLayer:
    """What every kvsqueeze layer reports about the memory it really holds, now and at its largest."""

    peak_bytes = 0

    @property
    def stored(self) -> int:
        """Tokens physically held."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return keys, values

    def kept_per_head(self) -> torch.Tensor:
        """Tokens held per (batch row, KV head)."""
        if not self.stored:
            return torch.zeros(0, 0, dtype=torch.long)
        batch, heads, stored, _ = self.keys.shape
        return torch.full((batch, heads), stored, dtype=torch.long)


class EvictingLayer(MeasuredLayer, DynamicLayer):
    """Dense layer: every (batch row, KV head) keeps the same number of tokens, in their original order."""

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0
        # per-token values a method keeps about the stored tokens ([batch, heads, stored], e.g. H2O's accumulated
        # attention); gathered with the tokens on eviction. Replaced, never mutated, so forks stay independent.
        self.state: dict[str, torch.Tensor] = {}

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        return super().update(key_states, value_states)

    def restart_positions(self, keys: torch.Tensor) -> None:
        """Store re-rotated `keys` whose positions are now 0..stored-1: the logical length becomes the stored one.

        For methods whose positions follow the cache rather than the text (rolling StreamingLLM).
        """
        self.keys, self.seen = keys, keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.stored + query_length, self.seen - self.stored

    def keep(self, mask: torch.Tensor) -> MeasuredLayer:
        """Keep the tokens where `mask` ([batch, kv_heads, stored]) is True and free the others.

        Returns the layer that now holds them: this one when every (batch row, head) keeps the same
        number of tokens, else a RaggedLayer, where each head keeps its own number.
        """
        counts = mask.sum(-1)
        n_keep = int(counts.flatten()[0])
        if not bool((counts == n_keep).all()):
            from .ragged import RaggedLayer

            ragged = RaggedLayer.from_dense(self.keys, self.values, mask, self.seen)
            ragged.peak_bytes = self.peak_bytes
            return ragged
        if n_keep < self.stored:
            batch, heads, _ = mask.shape
            index = mask.nonzero()[:, -1].view(batch, heads, n_keep)
            self.state = {name: values.gather(2, index) for name, values in self.state.items()
                          if values.shape[-1] == self.stored}
            index = index[..., None]
            self.keys = self.keys.gather(2, index.expand(-1, -1, -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, index.expand(-1, -1, -1, self.values.shape[-1]))
        return self

    def prune_key_channels(self, channels: torch.Tensor) -> MeasuredLayer:
        """Keep only `channels` [batch, kv_heads, kept_dim] of the keys: returns the (ragged) layer holding them."""
        from .ragged import RaggedLayer

        mask = torch.ones(self.keys.shape[:-1], dtype=torch.bool, device=self.keys.device)
        pruned = RaggedLayer.from_dense(self.keys, self.values, mask, self.seen, key_channels=channels)
        pruned.peak_bytes = self.peak_bytes
        return pruned

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        removable = min(-tokens_to_remove, self.stored)
        super().crop(-removable)
        self.seen -= removable

    def reset(self) -> None:
        super().reset()
        self.seen = 0


class SlidingWindowLayer(MeasuredLayer, DynamicSlidingWindowLayer):
    """The model's own sliding-window layer. It is already bounded by its window, so methods leave it alone."""


LAYER_TYPES = {"full_attention": EvictingLayer, "sliding_attention": SlidingWindowLayer,
               "chunked_attention": SlidingWindowLayer}


def layer_types(config) -> list[str]:
    config = config.get_text_config()
    types = getattr(config, "layer_types", None)
    if types is None:
        window = getattr(config, "sliding_window", None)
        types = ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers
    return list(types)


class SqueezeCache(Cache):
    """The kvsqueeze cache: a list of layers, one per attention layer of the model.

    Built from a model config, full-attention layers are `EvictingLayer`s (methods compress them) and
    sliding-window layers (Gemma 3, Mistral with a window) keep the model's own bounded window.
    """

    def __init__(self, config=None, layers: list | None = None):
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
                    layers.append(EvictingLayer())
        if layers is None:
            super().__init__(layer_class_to_replicate=EvictingLayer)
        else:
            super().__init__(layers=layers)

    def keep(self, layer_idx: int, mask: torch.Tensor) -> None:
        """Layer `layer_idx` keeps the tokens where `mask` is True: densely if every head keeps as many, else ragged."""
        self.layers[layer_idx] = self.layers[layer_idx].keep(mask)

    def prune_key_channels(self, layer_idx: int, channels: torch.Tensor) -> None:
        """Layer `layer_idx` keeps only `channels` [batch, kv_heads, kept_dim] of its keys (ThinK)."""
        self.layers[layer_idx] = self.layers[layer_idx].prune_key_channels(channels)

    def fork(self) -> "SqueezeCache":
        """A copy that shares every tensor with this cache; updating it leaves this cache as it is."""
        clone = copy.copy(self)
        clone.layers = [copy.copy(layer) for layer in self.layers]
        return clone

    def nbytes(self) -> int:
        """Bytes really held by the cache's tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def peak_bytes(self) -> int:
        """The sum over layers of the most bytes each layer held at once (before compression, for a prefill)."""
        return sum(layer.peak_bytes for layer in self.layers)

    def stored_lengths(self) -> list[int]:
        return [layer.stored for layer in self.layers]

    def kept_per_head(self) -> list[torch.Tensor]:
        """Tokens held per layer, as one [batch, kv_heads] tensor per layer."""
        return [layer.kept_per_head() for layer in self.layers]


def as_squeeze_cache(past) -> SqueezeCache:
    """A SqueezeCache sharing the tensors of `past`: a transformers Cache or a list of (keys, values) per layer."""
    if isinstance(past, SqueezeCache):
        return past.fork()
    layers = []
    for source in (past.layers if isinstance(past, Cache) else past):
        if isinstance(source, DynamicSlidingWindowLayer):
            layer = SlidingWindowLayer(sliding_window=source.sliding_window)
            layer.__dict__.update(source.__dict__)
        elif isinstance(source, DynamicLayer) or isinstance(source, (tuple, list)):
            keys, values = (source.keys, source.values) if isinstance(source, DynamicLayer) else source
            layer = EvictingLayer()
            if keys is not None and keys.numel():
                layer.update(keys, values)
        else:
            raise TypeError(f"kvsqueeze cannot compress a cache layer of type {type(source).__name__}")
        layers.append(layer)
    return SqueezeCache(layers=layers)
