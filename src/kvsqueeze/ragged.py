"""A cache layer where every (batch row, KV head) keeps its own number of tokens, and really frees the rest.

Kept tokens are packed in pages of `page_size` tokens: each page belongs to one (batch row, KV head)
segment; only the last page of what a segment kept, or of what it folded in, can be partly empty. Pages make
attention over the packed keys a batched matrix product (see `ragged_attention`; a quantized layer's pages are
decoded for each step into dense keys and values instead, see `decoded_attention`), and waste less than one page
per segment, which `nbytes()` counts with the index tensors. Tokens that arrive after compression (the question,
generated tokens) are the same for every head: they go to a dense tail.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention import causal_weights
from .layer import CompressibleLayer
from .quantizers import QuantizedPages, Quantizer, quantizer as as_quantizer


def page_size_for(mean_tokens: float) -> int:
    """A power of two between 16 and 128 tokens, about 1/64 of a segment: under ~1% padding, few pages."""
    return int(min(128, max(16, 2 ** round(math.log2(max(mean_tokens, 1) / 64)))))


def left_padded(states: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    """`states` with zeros (False) prepended along `dim` up to `length`."""
    shape = list(states.shape)
    shape[dim] = length - shape[dim]
    return torch.cat([states.new_zeros(shape), states], dim=dim)


class RaggedLayer(CompressibleLayer, CacheLayerMixin):
    """Per-head budgets that save real memory: packed pages per (batch row, KV head), plus a dense tail."""

    is_sliding = False
    is_croppable = False
    kind = "ragged"
    saved_tensors = ("pages_k", "pages_v", "page_segment", "page_fill", "lengths", "tail_k", "tail_v", "key_channels",
                     "fresh_valid", "pads")
    saved_numbers = ("peak_bytes", "seen", "page_size", "batch", "heads", "head_dim")
    _layout_of = None  # the pages' index tensors `_layout` was computed from, and its result

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0

    def inherit(self, previous: CompressibleLayer) -> "RaggedLayer":
        """Carry over what the layer this one replaces knew: its largest size and the padding it saw."""
        self.peak_bytes, self.pads = previous.peak_bytes, previous.pads
        return self

    @property
    def fresh(self) -> int:
        return self.tail_k.shape[-2]

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, seen: int,
                   page_size: int | None = None, key_channels: torch.Tensor | None = None,
                   quantizer: Quantizer | None = None, token_state: dict | None = None) -> "RaggedLayer":
        """Pack the tokens of keys/values [batch, heads, n, dim] where `mask` [batch, heads, n] is True.

        With `key_channels` [batch, heads, kept_dim], only those channels of the keys are stored (ThinK);
        attention reads the matching channels of the queries. With a `quantizer`, pages are its groups and
        are stored quantized, except the most recent tokens every head keeps (up to its residual window),
        which stay in full precision in the tail. `token_state` (per-token values [batch, heads, n] a method
        keeps, see `remember`) follows the kept tokens.
        """
        layer = cls()
        batch, heads, n, dim = keys.shape
        layer.head_dim, layer.quantizer, layer.key_channels = dim, quantizer, None
        layer.batch, layer.heads, layer.seen = batch, heads, seen
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        recent = quantizer.recent_run(mask) if quantizer is not None else 0
        layer.tail_k, layer.tail_v = keys[..., n - recent:, :].clone(), values[..., n - recent:, :].clone()
        if recent:
            mask = mask.clone()
            mask[..., n - recent:] = False
        if key_channels is not None:
            layer.key_channels = key_channels.reshape(batch * heads, -1)
            keys = keys.gather(-1, key_channels[:, :, None, :].expand(-1, -1, n, -1))
        layer.lengths = mask.sum(-1)
        layer.page_size = quantizer.group if quantizer is not None else page_size or page_size_for(
            layer.lengths.float().mean().item())
        layer.pages_k, layer.pages_v, layer.page_segment, layer.page_fill = layer._pack(keys, values, mask)
        layer.token_state = {}
        if token_state:
            longest = int(layer.lengths.max()) if layer.lengths.numel() else 0
            order = (~mask).long().argsort(dim=-1, stable=True)[..., :longest]  # each head's kept tokens first, in order
            layer.token_state = {name: torch.cat([state.gather(-1, order), state[..., n - recent:]], -1)
                                 for name, state in token_state.items() if state.shape[-1] == n}
        return layer

    def _pack(self, keys, values, mask):
        """(keys pages, values pages, page_segment, page_fill) holding the tokens where `mask` is True, each
        segment's in order; its pages are encoded by the layer's quantizer, if any."""
        batch, heads = mask.shape[:2]
        lengths = mask.sum(-1).flatten()
        pages_per_segment = (lengths + self.page_size - 1) // self.page_size
        first_page = torch.cumsum(pages_per_segment, 0) - pages_per_segment
        n_pages = int(pages_per_segment.sum())
        b, h, position = mask.nonzero(as_tuple=True)  # row-major: segment by segment, in token order
        segment = b * heads + h
        rank = torch.arange(len(segment), device=keys.device) - (torch.cumsum(lengths, 0) - lengths)[segment]
        page, slot = first_page[segment] + rank // self.page_size, rank % self.page_size
        token, stored = segment * mask.shape[-1] + position, page * self.page_size + slot  # as rows of 2-D views
        pages_k = keys.new_zeros(n_pages, self.page_size, keys.shape[-1])
        pages_v = values.new_zeros(n_pages, self.page_size, values.shape[-1])
        pages_k.flatten(0, 1).index_copy_(0, stored, keys.flatten(0, 2).index_select(0, token))
        pages_v.flatten(0, 1).index_copy_(0, stored, values.flatten(0, 2).index_select(0, token))
        page_segment = torch.repeat_interleave(torch.arange(batch * heads, device=keys.device), pages_per_segment)
        page_in_segment = torch.arange(n_pages, device=keys.device) - first_page[page_segment]
        page_fill = (lengths[page_segment] - page_in_segment * self.page_size).clamp(max=self.page_size)
        if self.quantizer is not None:
            pages_k = self.quantizer.encode(pages_k, page_fill, "keys")
            pages_v = self.quantizer.encode(pages_v, page_fill, "values")
        return pages_k, pages_v, page_segment, page_fill

    def adopt(self, tensors):
        self.dtype, self.device, self.is_initialized = tensors["tail_k"].dtype, tensors["tail_k"].device, True

    def to_saved(self):
        tensors, numbers = super().to_saved()
        for name in ("pages_k", "pages_v"):
            pages = tensors.pop(name)
            if isinstance(pages, QuantizedPages):
                tensors |= {f"{name}.{part}": t for part, t in pages.tensors.items()}
                numbers[f"{name}_shape"] = [pages.page_size, pages.dim]
            else:
                tensors[name] = pages
        return tensors, numbers | {"quantizer": None if self.quantizer is None else self.quantizer.spec()}

    @classmethod
    def from_saved(cls, tensors, numbers):
        spec = numbers.get("quantizer", numbers.get("codec"))  # "codec": files saved by kvsqueeze 0.1
        quantizer, tensors = as_quantizer(spec), dict(tensors)
        for name, role in (("pages_k", "keys"), ("pages_v", "values")):
            parts = {key[len(name) + 1:]: tensors.pop(key) for key in list(tensors) if key.startswith(name + ".")}
            if parts:
                if quantizer is None:
                    raise ValueError("quantized pages without the quantizer that made them")
                tensors[name] = QuantizedPages(quantizer, role, parts, numbers[f"{name}_shape"], tensors["tail_k"].dtype)
        layer = super().from_saved(tensors, numbers)
        layer.quantizer = quantizer
        return layer

    def check(self) -> None:
        super().check()
        pages = self.n_pages
        if (self.pages_v.shape[:2] != self.pages_k.shape[:2] or self.pages_k.shape[1] != self.page_size
                or self.page_segment.shape != (pages,) or self.page_fill.shape != (pages,)
                or tuple(self.lengths.shape) != (self.batch, self.heads)
                or int(self.page_fill.sum()) != int(self.lengths.sum())
                or (pages and int(self.page_segment.max()) >= self.batch * self.heads)
                or self.tail_k.shape[:3] != self.tail_v.shape[:3] or self.tail_k.shape[:2] != (self.batch, self.heads)):
            raise ValueError("the packed pages, their index and the tail do not fit together")

    # -- transformers' layer interface --

    def lazy_initialization(self, key_states, value_states):
        raise RuntimeError("a RaggedLayer is made from a compressed layer, never empty")

    def update(self, key_states, value_states, *args, **kwargs):
        if self.quantizer is not None:
            self._fold()
        self.seen += key_states.shape[-2]
        self.tail_k = torch.cat([self.tail_k, key_states], dim=-2)
        self.tail_v = torch.cat([self.tail_v, value_states], dim=-2)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return self.tail_k, self.tail_v  # attention reads the pages too: see `attend`

    def attend(self, call):
        """Attention over the pages and the tail (`ragged_attention`); the weights only where the model's own
        attention would return them (eager)."""
        allowed = self.observe(call.mask, call.query.shape[-2])
        if call.kwargs.get("softcap") is not None:
            raise NotImplementedError("attention softcapping is not supported on head-wise (ragged) layers")
        scaling = call.kwargs.get("scaling") or call.query.shape[-1] ** -0.5
        attention = ragged_attention if self.quantizer is None else decoded_attention
        out = attention(self, call.query, scaling, allowed)
        if call.implementation != "eager":
            return out, None
        keys, _, real = self.dense_view()
        return out, causal_weights(call.query, keys, real, scaling)

    def _fold(self) -> None:
        """Quantize the oldest tail tokens, whole groups at a time, while the tail holds more than the quantizer's
        full-precision window (KIVI's residual): each (batch row, head) gets pages of its real ones."""
        n = (self.tail_k.shape[-2] - self.quantizer.residual) // self.page_size * self.page_size
        if n <= 0:
            return
        keys, values = self.tail_k[..., :n, :], self.tail_v[..., :n, :]
        real = self.fresh_real(self.batch, self.heads, keys.device)[..., :n]
        if self.key_channels is not None:
            channels = self.key_channels.view(self.batch, self.heads, 1, -1).expand(-1, -1, n, -1)
            keys = keys.gather(-1, channels)
        pages_k, pages_v, page_segment, page_fill = self._pack(keys, values, real)
        segment = torch.cat([self.page_segment, page_segment])
        order = torch.argsort(segment, stable=True)  # each segment's pages together, in token order: see `decoded`
        self.pages_k, self.pages_v = self.pages_k.cat(pages_k)[order], self.pages_v.cat(pages_v)[order]
        self.page_segment, self.page_fill = segment[order], torch.cat([self.page_fill, page_fill])[order]
        self.lengths = self.lengths + real.sum(-1)
        self.tail_k, self.tail_v = self.tail_k[..., n:, :], self.tail_v[..., n:, :]
        self.token_state = {}  # the dense view is laid out anew
        if self.fresh_valid is not None:
            self.fresh_valid = self.fresh_valid[:, n:] if not bool(self.fresh_valid[:, n:].all()) else None

    def get_seq_length(self) -> int:
        return self.seen

    @property
    def stored(self) -> int:
        """The longest segment plus the tail."""
        return int(self.lengths.max()) + self.tail_k.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.fresh + query_length, self.seen - self.fresh

    def get_max_length(self) -> int:
        return -1  # no maximum (transformers' Cache.get_max_length asks every layer)

    def reset(self) -> None:
        raise RuntimeError("a RaggedLayer cannot be reset; make a new cache")

    # -- accounting --

    @property
    def n_pages(self) -> int:
        return self.pages_k.shape[0]

    def nbytes(self) -> int:
        tensors = (self.pages_k, self.pages_v, self.page_segment, self.page_fill, self.lengths, self.tail_k,
                   self.tail_v, self.key_channels)
        return sum(t.nbytes for t in tensors if t is not None)

    def kept_per_head(self) -> torch.Tensor:
        return self.lengths.cpu() + self.tail_k.shape[-2] - self.padding_held()

    # -- views and edits --

    def page_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pages of keys and values as tensors [pages, page_size, dim] (dequantized when quantized)."""
        if self.quantizer is None:
            return self.pages_k, self.pages_v
        return self.pages_k.dequantize(), self.pages_v.dequantize()

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """A quantized layer's keys and values for one step, [batch, heads, slots, dim], when every segment has its
        pages in order and as many of them (no head-wise budget, no ThinK; else None): the pages decoded straight
        into a row of slots per segment, then the tail; with which of the pages' slots hold tokens ([batch, heads,
        page slots]). When every segment also holds as many tokens in its first slots, each row is cut after them
        and the tail written there: no slot is empty (None)."""
        layout = None if self.key_channels is not None else self._layout()
        if layout is None:
            return None
        width, visible, length = layout
        keys, values = (self._decode_rows(pages, tail, width, length)
                        for pages, tail in ((self.pages_k, self.tail_k), (self.pages_v, self.tail_v)))
        return keys, values, None if length is not None else visible

    def _decode_rows(self, pages: QuantizedPages, tail: torch.Tensor, width: int, length: int | None) -> torch.Tensor:
        """`decoded`'s keys or values: the pages and the tail in rows of slots, [batch, heads, slots, dim]."""
        slots, fresh = width * self.page_size, self.fresh
        out = torch.empty(self.batch, self.heads, slots + fresh, tail.shape[-1], dtype=tail.dtype, device=tail.device)
        if len(pages):
            pages.decode_into(out[:, :, :slots].unflatten(2, (width, self.page_size)).flatten(0, 1))
        start = slots if length is None else length  # the tail overwrites the slots after the tokens
        out[:, :, start:start + fresh] = tail
        return out[:, :, :start + fresh]

    def _layout(self) -> tuple[int, torch.Tensor, int | None] | None:
        """When the pages are in segment order with as many per segment (computed when they change): the pages per
        segment, which of its slots hold tokens [batch, heads, slots], and the tokens per segment when all hold
        as many in their first slots (else None). None when the pages are not so laid out."""
        pages_now = (self.page_segment, self.page_fill, self.lengths)
        if self._layout_of is not None and all(a is b for a, b in zip(self._layout_of, pages_now)):
            return self._layout_of[3]
        segments, pages = self.batch * self.heads, self.n_pages
        width = pages // segments if segments else 0
        layout = None
        if pages == segments * width and torch.equal(
                self.page_segment, torch.arange(pages, device=self.page_segment.device) // max(width, 1)):
            filled = torch.arange(self.page_size, device=self.page_fill.device)[None, :] < self.page_fill[:, None]
            visible = filled.view(self.batch, self.heads, width * self.page_size)
            lengths = self.lengths.flatten()
            length = int(lengths[0]) if lengths.numel() and bool((lengths == lengths[0]).all()) else None
            if length is not None and not bool(visible[..., :length].all()):
                length = None
            layout = (width, visible, length)
        self._layout_of = (*pages_now, layout)
        return layout

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values [batch, heads, longest + tail, dim], padded, with the mask of real tokens.

        Each segment's tokens come first, in order, then the tail; the padding sits between them.
        """
        batch, heads = self.batch, self.heads
        pages_k, pages_v = self.page_data()
        longest = int(self.lengths.max()) if self.lengths.numel() else 0
        slots = torch.arange(self.page_size, device=self.page_fill.device)
        valid = slots[None, :] < self.page_fill[:, None]  # [pages, page_size]
        # a segment's pages are in token order, though not adjacent once the tail was folded into new pages
        order = torch.argsort(self.page_segment, stable=True)
        fill = self.page_fill[order]
        segment_start = self.lengths.flatten().cumsum(0) - self.lengths.flatten()
        offset = torch.empty_like(fill)
        offset[order] = fill.cumsum(0) - fill - segment_start[self.page_segment[order]]
        position = (offset[:, None] + slots[None, :])[valid]
        segment = self.page_segment[:, None].expand(-1, self.page_size)[valid]
        keys = pages_k.new_zeros(batch * heads, longest, self.head_dim)
        values = pages_v.new_zeros(batch * heads, longest, pages_v.shape[-1])
        if self.key_channels is not None:  # pruned channels come back as zeros
            pages_k = pages_k.new_zeros(*pages_k.shape[:2], self.head_dim).scatter_(
                -1, self.key_channels[self.page_segment][:, None, :].expand(-1, self.page_size, -1), pages_k)
        keys[segment, position] = pages_k[valid]
        values[segment, position] = pages_v[valid]
        real = torch.arange(longest, device=keys.device)[None, :] < self.lengths.flatten()[:, None]
        keys = torch.cat([keys.view(batch, heads, longest, self.tail_k.shape[-1]), self.tail_k], dim=2)
        values = torch.cat([values.view(batch, heads, longest, self.tail_v.shape[-1]), self.tail_v], dim=2)
        real = torch.cat([real.view(batch, heads, longest), self.fresh_real(batch, heads, real.device)], dim=2)
        return keys, values, real

    def channels(self) -> torch.Tensor | None:
        return None if self.key_channels is None else self.key_channels.view(self.batch, self.heads, -1)

    def keep(self, mask, keys=None, values=None):
        """Keep the tokens of `dense_view()` where `mask` is True (padding is never kept)."""
        dense_keys, dense_values, real = self.dense_view()
        return RaggedLayer.from_dense(dense_keys if keys is None else keys, dense_values if values is None else values,
                                      mask & real, self.seen, key_channels=self.channels(), quantizer=self.quantizer,
                                      token_state=self.token_state).inherit(self)

    def prune_key_channels(self, channels):
        keys, values, real = self.dense_view()
        return RaggedLayer.from_dense(keys, values, real, self.seen, self.page_size, key_channels=channels,
                                      quantizer=self.quantizer, token_state=self.token_state).inherit(self)

    def as_ragged(self, page_size: int | None = None) -> "RaggedLayer":
        """This layer, with pages of `page_size` tokens (None: as they are). Repacking is exact: only unquantized
        pages, with no recent tokens in the tail, are repacked."""
        if page_size in (None, self.page_size):
            return self
        if self.quantizer is not None or self.fresh:
            raise ValueError("a quantized layer, or one holding tokens after its compression, keeps its pages")
        keys, values, real = self.dense_view()
        return RaggedLayer.from_dense(keys, values, real, self.seen, page_size, key_channels=self.channels()
                                      ).inherit(self)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` [new batch] (repeated, reordered or a subset), exactly: pages are moved, never
        decoded and stored again, so a quantized layer keeps its bits."""
        index = index.to(self.page_segment.device)
        pages, segments = [], []
        row_of_page, head_of_page = self.page_segment // self.heads, self.page_segment % self.heads
        for new_row, row in enumerate(index.tolist()):
            own = (row_of_page == row).nonzero().flatten()  # in order: a segment's pages stay in token order
            pages.append(own)
            segments.append(new_row * self.heads + head_of_page[own])
        pages, segment = torch.cat(pages), torch.cat(segments)
        self.pages_k, self.pages_v = self.pages_k[pages], self.pages_v[pages]
        self.page_segment, self.page_fill = segment, self.page_fill[pages]
        self.lengths = self.lengths[index]
        self.tail_k, self.tail_v = self.tail_k[index], self.tail_v[index]
        if self.key_channels is not None:
            self.key_channels = self.channels()[index].reshape(len(index) * self.heads, -1)
        if self.fresh_valid is not None:
            self.fresh_valid = self.fresh_valid[index.to(self.fresh_valid.device)]
        if self.pads is not None:
            self.pads = self.pads[index.to(self.pads.device)]
        self.token_state = {name: state[index.to(state.device)] for name, state in self.token_state.items()}
        self.batch = len(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    @classmethod
    def stack(cls, layers: list["RaggedLayer"]) -> "RaggedLayer":
        """The rows of `layers` (same heads, page size, quantizer and tail length) as one batch, exactly: pages are
        concatenated, never decoded. A layer that has seen fewer tokens gets left padding, which it never stores."""
        first = layers[0]
        for layer in layers[1:]:
            if (layer.quantizer is None) != (first.quantizer is None) or (
                    layer.quantizer and layer.quantizer.spec() != first.quantizer.spec()):
                raise ValueError("layers stored by different quantizers cannot share a batch")
            if (layer.heads, layer.head_dim, layer.page_size) != (first.heads, first.head_dim, first.page_size):
                raise ValueError("these layers cannot share a batch: their heads or page sizes differ")
            if (layer.key_channels is None) != (first.key_channels is None) or (
                    layer.key_channels is not None and layer.key_channels.shape[-1] != first.key_channels.shape[-1]):
                raise ValueError("layers with different pruned key channels cannot share a batch")
        stacked = cls()
        stacked.__dict__.update(first.__dict__)
        segments_before = torch.tensor([0] + [layer.batch * layer.heads for layer in layers[:-1]]).cumsum(0).tolist()
        stacked.page_segment = torch.cat([layer.page_segment + offset for layer, offset in zip(layers, segments_before)])
        stacked.page_fill = torch.cat([layer.page_fill for layer in layers])
        pages_k, pages_v = first.pages_k, first.pages_v
        for layer in layers[1:]:
            pages_k = pages_k.cat(layer.pages_k) if first.quantizer else torch.cat([pages_k, layer.pages_k])
            pages_v = pages_v.cat(layer.pages_v) if first.quantizer else torch.cat([pages_v, layer.pages_v])
        stacked.pages_k, stacked.pages_v = pages_k, pages_v
        stacked.lengths = torch.cat([layer.lengths for layer in layers])
        tail = max(layer.fresh for layer in layers)  # shorter tails are left-padded, their padding marked unreal
        stacked.tail_k = torch.cat([left_padded(layer.tail_k, tail) for layer in layers])
        stacked.tail_v = torch.cat([left_padded(layer.tail_v, tail) for layer in layers])
        if first.key_channels is not None:
            stacked.key_channels = torch.cat([layer.key_channels for layer in layers])
        stacked.batch = sum(layer.batch for layer in layers)
        stacked.seen = max(layer.seen for layer in layers)
        pads = stacked.seen - torch.cat([layer.row_lengths(layer.batch) for layer in layers])
        stacked.pads = pads if bool(pads.any()) else None
        real = torch.cat([left_padded(layer.fresh_real(layer.batch, 1, layer.tail_k.device), tail, dim=-1)[:, 0]
                          for layer in layers])
        stacked.fresh_valid = None if bool(real.all()) else real
        stacked.peak_bytes = sum(layer.peak_bytes for layer in layers)
        stacked.token_state = {}
        return stacked

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0 or -tokens_to_remove > self.tail_k.shape[-2]:
            raise ValueError("a RaggedLayer can only crop tokens added after compression")
        if tokens_to_remove:
            self.tail_k, self.tail_v = self.tail_k[..., :tokens_to_remove, :], self.tail_v[..., :tokens_to_remove, :]
            self.seen += tokens_to_remove
            if self.fresh_valid is not None:
                self.fresh_valid = self.fresh_valid[:, :tokens_to_remove]


def ragged_attention(layer, query: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None,
                     pages: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention of `query` [batch, heads, q, dim] over a RaggedLayer's pages (float: its own, or `pages`, keys and
    values decoded from a quantized layer's) and dense tail; [batch, q, heads, dim].

    Each KV head's segment is attended by the query heads of its group. Pages give batched matrix
    products; a segment's softmax is assembled from per-page maxima and sums (segment-wise softmax),
    then merged with the tail's, where the new tokens are causal among themselves and `allowed`
    ([batch, 1, q or 1, tail], from the model's mask) hides padding.
    """
    batch, n_heads, q_len, dim = query.shape
    segments = batch * layer.heads
    rows = n_heads // layer.heads * q_len  # query rows per segment: the group's heads x new tokens
    queries = query.reshape(segments, rows, dim) * scaling  # scaled once, for the tail and the pages

    tail_k, tail_v = layer.tail_k.reshape(segments, -1, dim), layer.tail_v.reshape(segments, -1, layer.tail_v.shape[-1])
    logits = torch.bmm(queries, tail_k.transpose(1, 2)).float()
    tail_len = tail_k.shape[1]
    visible = tail_visible(q_len, tail_len, allowed, query.device)
    if visible is not None:
        visible = visible[:, 0][:, None, None].expand(batch, layer.heads, n_heads // layer.heads, q_len, tail_len)
        logits = logits.masked_fill(~visible.reshape(segments, rows, tail_len), float("-inf"))
    top = logits.amax(-1).clamp(min=torch.finfo(logits.dtype).min)  # a padding query may see nothing at all
    weights = (logits - top[..., None]).exp()
    total = weights.sum(-1)
    out = torch.bmm(weights.to(tail_v.dtype), tail_v).float()

    if layer.n_pages:
        segment = layer.page_segment
        if layer.key_channels is not None:  # ThinK: the keys kept only some channels; so do the queries
            channels = layer.key_channels[:, None, :].expand(-1, rows, -1)
            queries = queries.gather(-1, channels)
        pages_k, pages_v = pages or (layer.pages_k, layer.pages_v)
        page_logits = torch.bmm(queries[segment], pages_k.transpose(1, 2)).float()
        empty = torch.arange(layer.page_size, device=query.device)[None, :] >= layer.page_fill[:, None]
        page_logits = page_logits.masked_fill_(empty[:, None, :], float("-inf"))
        page_top = page_logits.amax(-1)  # [pages, rows]
        top_all = top.scatter_reduce(0, segment[:, None].expand(-1, rows), page_top, "amax")
        page_weights = (page_logits - top_all[segment][..., None]).exp()  # not in place: amax's backward reads them
        page_out = torch.bmm(page_weights.to(pages_v.dtype), pages_v).float()
        rescale = (top - top_all).exp_()
        total = total.mul_(rescale).index_add_(0, segment, page_weights.sum(-1))
        out = out.mul_(rescale[..., None]).index_add_(0, segment, page_out)

    out = (out / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]).to(query.dtype)  # nothing visible: 0
    return out.view(batch, n_heads, q_len, -1).transpose(1, 2).contiguous()


def tail_visible(q_len: int, fresh: int, allowed: torch.Tensor | None, device) -> torch.Tensor | None:
    """Which of the tail's `fresh` tokens each of the `q_len` new ones (the tail's last) sees, [batch or 1, 1, q_len,
    fresh], None where all see all: the new tokens are causal among themselves, and `allowed` ([batch, 1, q or 1,
    fresh], from the model's mask) hides padding."""
    visible = None
    if q_len > 1:
        visible = torch.ones(q_len, fresh, dtype=torch.bool, device=device).tril(fresh - q_len)[None, None]
    if allowed is not None:
        visible = allowed if visible is None else visible & allowed
    return visible


def decoded_attention(layer, query: torch.Tensor, scaling: float, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of `query` [batch, heads, q, dim] over a quantized RaggedLayer; [batch, q, heads, dim].

    The layer's pages are decoded for this step: a float copy of one layer's kept tokens lives while the layer
    attends, the cache holds only codes. When every head holds as many pages (one budget for all heads), they
    are decoded into dense keys and values (`RaggedLayer.decoded`) read by one `scaled_dot_product_attention`,
    empty slots masked, the new tokens causal among themselves and `allowed` ([batch, 1, q or 1, tail], from the
    model's mask) hiding padding in the tail; else (head-wise budgets, ThinK) the decoded pages are attended
    as float pages are (`ragged_attention`), padding nothing.
    """
    decoded = layer.decoded()
    if decoded is None:
        return ragged_attention(layer, query, scaling, allowed, pages=layer.page_data())
    batch, n_heads, q_len, _ = query.shape
    keys, values, visible = decoded
    fresh = layer.fresh
    tail = tail_visible(q_len, fresh, allowed, query.device)
    mask = None
    if visible is not None or tail is not None:
        ones = lambda *shape: torch.ones(shape, dtype=torch.bool, device=query.device)
        pages = ones(batch, layer.heads, keys.shape[2] - fresh) if visible is None else visible
        tail = ones(1, 1, q_len, fresh) if tail is None else tail
        mask = torch.cat([pages[:, :, None, :].expand(-1, -1, q_len, -1), tail.expand(batch, layer.heads, -1, -1)], -1)
        mask = mask.repeat_interleave(n_heads // layer.heads, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()
