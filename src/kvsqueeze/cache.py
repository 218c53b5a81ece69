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
from typing import ClassVar

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache, DynamicLayer, DynamicSlidingWindowLayer


class MeasuredLayer:
    """What every kvsqueeze layer reports about the memory it really holds, now and at its largest, and how it is
    saved: `saved_tensors` and `saved_numbers` name the attributes a saved context stores (None tensors are left
    out), `kind` names the layer class in the file."""

    kind: ClassVar[str] = ""
    saved_tensors: ClassVar[tuple[str, ...]] = ("keys", "values")
    saved_numbers: ClassVar[tuple[str, ...]] = ("peak_bytes",)
    peak_bytes = 0

    @property
    def stored(self) -> int:
        """Tokens physically held."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors this layer holds together with other layers (the cache counts them once, not in `nbytes`)."""
        return []

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return keys, values

    def to_saved(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, numbers) to write in a saved context."""
        tensors = {name: getattr(self, name) for name in self.saved_tensors if getattr(self, name, None) is not None}
        if tensors.get("keys") is not None and tensors["keys"].numel() == 0:
            del tensors["keys"], tensors["values"]
        return tensors, {name: getattr(self, name) for name in self.saved_numbers}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], numbers: dict) -> "MeasuredLayer":
        """The layer `to_saved` described; raises ValueError when the parts do not fit together."""
        layer = cls(**numbers)
        for name in cls.saved_numbers:
            setattr(layer, name, numbers[name])
        layer.adopt(tensors)
        for name in cls.saved_tensors:
            setattr(layer, name, tensors.get(name))
        layer.check()
        return layer

    def adopt(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the dtype and device of saved tensors (before they are set)."""
        if "keys" in tensors:
            self.lazy_initialization(tensors["keys"], tensors["values"])

    def check(self) -> None:
        keys, values = self.keys, self.values
        if keys is not None and keys.numel():
            if values is None or keys.dim() != 4 or keys.shape[:-1] != values.shape[:-1]:
                raise ValueError("keys and values do not match")

    def kept_per_head(self) -> torch.Tensor:
        """Tokens held per (batch row, KV head)."""
        if not self.stored:
            return torch.zeros(0, 0, dtype=torch.long)
        batch, heads, stored, _ = self.keys.shape
        return torch.full((batch, heads), stored, dtype=torch.long)


class CompressibleLayer(MeasuredLayer):
    """What a layer that methods compress knows about its tokens, besides the tensors.

    - `seen`: the logical length (tokens the model has seen, padding included);
    - `fresh`: how many of the stored tokens arrived after the last compression. Their columns of the
      mask transformers builds are exact (padding and causality); all older stored tokens are kept
      context tokens, always visible;
    - `fresh_valid` [batch, fresh]: which fresh tokens are real, not padding (None: all), as the attention
      function reads it from the mask; `pads` [batch]: padding tokens seen per row.
    Padding is never kept by a compression, so a row's logical length is `seen - pads`.
    """

    seen = 0
    fresh_valid: torch.Tensor | None = None
    pads: torch.Tensor | None = None

    def check(self) -> None:
        super().check()
        batch, heads = self.kept_per_head().shape
        if self.fresh_valid is not None and tuple(self.fresh_valid.shape) != (batch, self.fresh):
            raise ValueError("the padding mask does not match the stored tokens")
        if self.pads is not None and tuple(self.pads.shape) != (batch,):
            raise ValueError("the padding counts do not match the batch")
        if not 0 <= self.fresh <= self.stored or self.stored > self.seen:
            raise ValueError(f"inconsistent lengths: {self.stored} stored, {self.fresh} fresh, {self.seen} seen")

    def observe(self, valid: torch.Tensor | None, n_new: int) -> None:
        """The attention function's report: validity of the fresh tokens as the mask gives it (None: all are real),
        the last `n_new` being this forward's. The padding the layer already knew of among its older fresh tokens
        stays padding (a stacked context's shorter tail: the mask cannot know of it)."""
        known = self.fresh_valid
        if known is not None:
            valid = torch.ones(known.shape[0], self.fresh, dtype=torch.bool) if valid is None else valid.clone()
            valid[:, : known.shape[1]] &= known.to(valid.device)
        if valid is not None and bool(valid.all()):
            valid = None
        if valid is not None:
            new_pads = (~valid[:, -n_new:]).sum(-1)
            self.pads = new_pads if self.pads is None else self.pads + new_pads
        self.fresh_valid = valid

    def padding_held(self) -> torch.Tensor | int:
        """Padding tokens stored per batch row, [batch, 1] (0 when none)."""
        return 0 if self.fresh_valid is None else (~self.fresh_valid).sum(-1, keepdim=True).cpu()

    def kept_per_head(self) -> torch.Tensor:
        """Real tokens held per (batch row, KV head): stored padding does not count."""
        return super().kept_per_head() - self.padding_held()

    def row_lengths(self, batch: int) -> torch.Tensor:
        """Real tokens seen per batch row: [batch]."""
        seen = torch.full((batch,), self.seen, dtype=torch.long)
        return seen if self.pads is None else seen - self.pads.cpu()

    def fresh_mask(self, batch: int, heads: int, device) -> torch.Tensor | None:
        """[batch, heads, fresh] validity of the fresh tokens, or None when all are real."""
        if self.fresh_valid is None:
            return None
        return self.fresh_valid[:, None, :].expand(batch, heads, -1).to(device)

    def fresh_real(self, batch: int, heads: int, device) -> torch.Tensor:
        """[batch, heads, fresh] validity of the fresh tokens (all True without padding)."""
        real = self.fresh_mask(batch, heads, device)
        return torch.ones(batch, heads, self.fresh, dtype=torch.bool, device=device) if real is None else real


class EvictingLayer(CompressibleLayer, DynamicLayer):
    """Dense layer: every (batch row, KV head) keeps the same number of tokens, in their original order."""

    kind = "evicting"
    saved_tensors = ("keys", "values", "fresh_valid", "pads")
    saved_numbers = ("peak_bytes", "seen", "fresh")

    def __init__(self, codec=None, **kwargs):
        super().__init__()
        self.codec = codec  # a Quantizer: what this layer keeps is stored quantized (in a RaggedLayer's pages)
        self.seen = 0
        self.fresh = 0
        # per-token values a method keeps about the stored tokens ([batch, heads, stored], e.g. H2O's accumulated
        # attention); gathered with the tokens on eviction. Replaced, never mutated, so forks stay independent.
        self.state: dict[str, torch.Tensor] = {}

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        self.fresh += key_states.shape[-2]
        keys, values = super().update(key_states, value_states)
        keys.kvsqueeze_layer = self  # the attention function reads this layer's masks and padding
        return keys, values

    def to_saved(self):
        tensors, numbers = super().to_saved()
        return tensors | {f"state.{name}": values for name, values in self.state.items()}, numbers

    @classmethod
    def from_saved(cls, tensors, numbers):
        layer = super().from_saved(tensors, numbers)
        layer.state = {name[len("state."):]: values for name, values in tensors.items() if name.startswith("state.")}
        return layer

    def restart_positions(self, keys: torch.Tensor) -> None:
        """Store re-rotated `keys` whose positions are now 0..stored-1: the logical length becomes the stored one.

        For methods whose positions follow the cache rather than the text (rolling StreamingLLM).
        """
        self.keys, self.seen, self.fresh = keys, keys.shape[-2], 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.fresh + query_length, self.seen - self.fresh

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.fresh_valid is not None:
            self.fresh_valid = self.fresh_valid[index.to(self.fresh_valid.device)]
        if self.pads is not None:
            self.pads = self.pads[index.to(self.pads.device)]
        self.state = {name: values[index.to(values.device)] for name, values in self.state.items()}

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

    def keep(self, mask: torch.Tensor) -> MeasuredLayer:
        """Keep the tokens where `mask` ([batch, kv_heads, stored]) is True and free the others.

        Returns the layer that now holds them: this one when every (batch row, head) keeps the same
        number of tokens, else a RaggedLayer, where each head keeps its own number; a RaggedLayer too when
        the layer has a codec, whose pages are stored quantized.
        """
        counts = mask.sum(-1)
        n_keep = int(counts.flatten()[0])
        if not bool((counts == n_keep).all()) or self.codec is not None:
            from .ragged import RaggedLayer

            return RaggedLayer.from_dense(self.keys, self.values, mask, self.seen, codec=self.codec).inherit(self)
        self.fresh, self.fresh_valid = 0, None  # padding is never kept: all stored tokens are real from now on
        if n_keep < self.stored:
            batch, heads, _ = mask.shape
            index = mask.nonzero()[:, -1].view(batch, heads, n_keep)
            self.state = {name: values.gather(2, index) for name, values in self.state.items()
                          if values.shape[-1] == self.stored}
            index = index[..., None]
            self.keys = self.keys.gather(2, index.expand(-1, -1, -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, index.expand(-1, -1, -1, self.values.shape[-1]))
        return self

    def as_ragged(self, page_size: int | None = None) -> MeasuredLayer:
        """The RaggedLayer holding this layer's real tokens (quantized, with a quantizer)."""
        from .ragged import RaggedLayer

        return RaggedLayer.from_dense(self.keys, self.values, self.real_mask(), self.seen, page_size,
                                      codec=self.codec).inherit(self)

    def prune_key_channels(self, channels: torch.Tensor) -> MeasuredLayer:
        """Keep only `channels` [batch, kv_heads, kept_dim] of the keys: returns the (ragged) layer holding them."""
        from .ragged import RaggedLayer

        return RaggedLayer.from_dense(self.keys, self.values, self.real_mask(), self.seen, key_channels=channels,
                                      codec=self.codec).inherit(self)

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


class SlidingWindowLayer(MeasuredLayer, DynamicSlidingWindowLayer):
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
                    layers.append(EvictingLayer(codec=quantizer))
        if layers is None:
            super().__init__(layer_class_to_replicate=EvictingLayer)
        else:
            super().__init__(layers=layers)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Masks cover the most recent tokens, as many as the layer with the most fresh tokens holds.

        transformers builds one mask per forward from these sizes; every compressible layer reads the
        columns of its own fresh tokens from its end (see `attention.py`), so it must be wide enough for all.
        """
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, CompressibleLayer):
            return super().get_mask_sizes(query_length, layer_idx)
        widest = max(other.fresh for other in self.layers if isinstance(other, CompressibleLayer))
        return widest + query_length, layer.seen - widest

    @property
    def compressible(self) -> list[int]:
        """The layers methods compress (sliding-window layers are bounded by the model itself)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressibleLayer)]

    def keep(self, layer_idx: int, mask: torch.Tensor) -> None:
        """Layer `layer_idx` keeps the tokens where `mask` is True: densely if every head keeps as many, else ragged."""
        self.layers[layer_idx] = self.layers[layer_idx].keep(mask)

    def quantize(self, layer_idx: int | None = None) -> None:
        """Store quantized every layer (or layer `layer_idx`) that has a quantizer and still holds full-precision
        tokens. A method's compression quantizes the layers it compresses; this covers the rest (quantization
        alone, layers a method leaves whole)."""
        for i in range(len(self.layers)) if layer_idx is None else [layer_idx]:
            layer = self.layers[i]
            if isinstance(layer, EvictingLayer) and layer.codec is not None and layer.stored:
                self.layers[i] = layer.keep(layer.real_mask())

    def prune_key_channels(self, layer_idx: int, channels: torch.Tensor) -> None:
        """Layer `layer_idx` keeps only `channels` [batch, kv_heads, kept_dim] of its keys (ThinK)."""
        self.layers[layer_idx] = self.layers[layer_idx].prune_key_channels(channels)

    @classmethod
    def stack(cls, caches: list["SqueezeCache"]) -> "SqueezeCache":
        """The rows of `caches` (of one model) as one batch, to generate for them at once: each compressible layer
        becomes a RaggedLayer holding every row's tokens exactly as it held them (quantized pages are moved, not
        stored again); a context that has seen fewer tokens gets left padding, which is never stored. Raises
        ValueError for what cannot share a batch (sliding-window layers, different quantizers)."""
        from .ragged import RaggedLayer, page_size_for

        layers = []
        for i, group in enumerate(zip(*(cache.layers for cache in caches))):
            if not all(isinstance(layer, CompressibleLayer) for layer in group):
                raise ValueError(f"layer {i} is a {type(group[0]).__name__}: contexts of a model with sliding-window "
                                 "layers cannot share a batch")
            ragged = [layer.as_ragged() for layer in group]
            if all(layer.codec is None for layer in ragged):
                size = page_size_for(torch.cat([layer.lengths.flatten() for layer in ragged]).float().mean().item())
                ragged = [layer.as_ragged(size) for layer in ragged]
            layers.append(RaggedLayer.stack(ragged))
        if not layers or len({len(cache.layers) for cache in caches}) != 1:
            raise ValueError("only caches of one model can share a batch")
        return cls(layers=layers)

    def fork(self) -> "SqueezeCache":
        """A copy that shares every tensor with this cache; updating it leaves this cache as it is."""
        clone = copy.copy(self)
        clone.layers = [copy.copy(layer) for layer in self.layers]
        return clone

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


def quantizer_like(layer: BaseQuantizedLayer):
    """kvsqueeze's quantizer for what a transformers quantized layer (quanto, HQQ backends) stores: the same bits
    and full-precision residual window, KIVI's layout (keys per channel, values per token)."""
    from .quantizers import KIVI

    return KIVI(bits=layer.nbits, residual=layer.residual_length)


def quantized_contents(layer: BaseQuantizedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values a transformers quantized layer holds, decoded by its own backend, then its residual ones."""
    if layer._quantized_keys is None:
        return layer.keys, layer.values
    keys, values = layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)
    if hasattr(layer, "_apply_pending_reorder"):
        keys, values = layer._apply_pending_reorder(keys, values)
    if layer.keys is not None and layer.keys.dim() == 4:
        keys, values = torch.cat([keys, layer.keys], dim=-2), torch.cat([values, layer.values], dim=-2)
    return keys, values


def as_squeeze_cache(past) -> SqueezeCache:
    """A SqueezeCache with the tokens of `past`: a transformers Cache or a list of (keys, values) per layer.

    Dense tensors are shared, not copied. The layers of a transformers quantized cache (quanto, HQQ) are
    decoded by their backend and get kvsqueeze's matching quantizer (`quantizer_like`): a method evicts
    from the decoded tokens and the layer stores what it keeps quantized again (`SqueezeCache.quantize`
    stores the others).
    """
    if isinstance(past, SqueezeCache):
        return past.fork()
    layers = []
    for source in (past.layers if isinstance(past, Cache) else past):
        if isinstance(source, BaseQuantizedLayer):
            keys, values = quantized_contents(source)
            layer = EvictingLayer(codec=quantizer_like(source))
            if keys is not None and keys.numel():
                layer.update(keys, values)
        elif isinstance(source, DynamicSlidingWindowLayer):
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
