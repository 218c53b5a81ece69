"""MiniCache's layer kind: two adjacent layers storing one direction per token together, each its own magnitudes.

Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language Models", NeurIPS 2024,
arXiv:2405.14366. `merge_pair` replaces two dense layers of a cache by a pair of `MergedLayer`s (see
`methods/minicache.py` for the method that decides which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cache import EvictingLayer, SqueezeCache


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between unit vectors a and b [..., dim], a fraction t of the way to b."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1, 1)
    angle = cos.arccos()
    sin = angle.sin()
    near = sin < 1e-6  # (anti)parallel directions: interpolate linearly
    wa = torch.where(near, 1 - t, ((1 - t) * angle).sin() / sin.clamp(min=1e-6))
    wb = torch.where(near, t, (t * angle).sin() / sin.clamp(min=1e-6))
    return F.normalize(wa * a + wb * b, dim=-1)


class MergedPair:
    """What two adjacent layers store once, together: per token, one direction of the keys and one of the values
    (SLERP of the two layers' directions), and which tokens are retained unmerged ([batch, kv_heads, n] mask)."""

    def __init__(self, first: EvictingLayer, second: EvictingLayer, t: float, retention: float):
        self.directions, self.retained = [], None
        self.norms, self.originals = ([], []), ([], [])  # per layer of the pair: keys', then values'
        for states in ("keys", "values"):
            a, b = getattr(first, states).float(), getattr(second, states).float()
            unit_a, unit_b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
            if self.retained is None:  # tokens whose keys point too differently in the two layers stay as they are
                distance = (unit_a * unit_b).sum(-1).clamp(-1, 1).arccos() / torch.pi  # in [0, 1]
                low, high = distance.amin(-1, keepdim=True), distance.amax(-1, keepdim=True)
                self.retained = high - distance <= retention * (high - low)  # retention 1: all, exactly
            self.directions.append(slerp(unit_a, unit_b, t).to(first.keys.dtype))
            for side, original in enumerate((a, b)):
                self.norms[side].append(original.norm(dim=-1).to(first.keys.dtype))
                self.originals[side].append(original[self.retained].to(first.keys.dtype))

    def restore(self, side: int, kind: int) -> torch.Tensor:
        """Layer `side`'s keys (kind 0) or values (kind 1): its magnitudes along the shared directions, retained
        tokens exactly as they were."""
        states = self.directions[kind] * self.norms[side][kind][..., None]
        states[self.retained] = self.originals[side][kind]
        return states


class MergedLayer(EvictingLayer):
    """One layer of a merged pair: its magnitudes and retained tokens, the pair's shared directions, and, in full,
    the tokens that came after the merge (the question, the answer). Attention gets its keys and values restored."""

    kind = "minicache"

    def __init__(self, pair: MergedPair, side: int, merged: EvictingLayer):
        super().__init__()
        self.pair, self.side, self.merged_tokens = pair, side, merged.stored
        self.seen, self.peak_bytes, self.pads = merged.seen, merged.peak_bytes, merged.pads
        self.dtype, self.device = merged.keys.dtype, merged.keys.device
        # new tensors, not views of the merged layer's: those would keep its whole storage alive
        self.tail_k = merged.keys.new_empty(*merged.keys.shape[:2], 0, merged.keys.shape[-1])
        self.tail_v = merged.values.new_empty(*merged.values.shape[:2], 0, merged.values.shape[-1])
        self.is_initialized = True

    # keys/values are what attention reads, restored on demand; only `None` (a reset) can be assigned
    def _states(kind: int):
        def get(self):
            if self.__dict__.get("pair") is None:
                return None
            tail = (self.tail_k, self.tail_v)[kind]
            return torch.cat([self.pair.restore(self.side, kind), tail], dim=-2)

        def set(self, value):
            if value is not None:
                raise NotImplementedError("a MiniCache layer's tokens cannot be replaced")
            self.__dict__["pair"] = None

        return property(get, set)

    keys, values = _states(0), _states(1)
    del _states

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        self.fresh += key_states.shape[-2]
        self.tail_k = torch.cat([self.tail_k, key_states], dim=-2)
        self.tail_v = torch.cat([self.tail_v, value_states], dim=-2)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        return self.keys, self.values

    @property
    def stored(self) -> int:
        return self.merged_tokens + self.tail_k.shape[-2]

    def kept_per_head(self) -> torch.Tensor:
        batch, heads = self.tail_k.shape[:2]
        return torch.full((batch, heads), self.stored, dtype=torch.long) - self.padding_held()

    def nbytes(self) -> int:
        """Bytes this layer holds alone: its magnitudes, its retained tokens, its tail (the pair's directions are
        shared: see `shared_tensors`)."""
        own = list(self.pair.norms[self.side]) + list(self.pair.originals[self.side]) + [self.tail_k, self.tail_v]
        return sum(t.nbytes for t in own)

    def shared_tensors(self) -> list[torch.Tensor]:
        return self.pair.directions + [self.pair.retained]

    def crop(self, tokens_to_remove: int) -> None:
        removable = min(-tokens_to_remove, self.fresh)
        self.tail_k, self.tail_v = self.tail_k[..., :self.tail_k.shape[-2] - removable, :], \
            self.tail_v[..., :self.tail_v.shape[-2] - removable, :]
        self.seen -= removable
        self.fresh -= removable
        if self.fresh_valid is not None:
            self.fresh_valid = self.fresh_valid[:, : self.fresh]

    def unsupported(self, *args, **kwargs):
        raise NotImplementedError("MiniCache layers cannot be compressed further, saved, or expanded for beams")

    keep = prune_key_channels = as_ragged = to_saved = reorder_cache = batch_repeat_interleave = batch_select_indices = \
        unsupported


def merge_pair(cache: SqueezeCache, first: int, second: int, interpolation: float, retention: float) -> None:
    """Layers `first` and `second` of `cache` become a merged pair: SLERP of their directions at `interpolation`,
    the tokens whose keys differ most between them (`retention`, see MiniCache) kept unmerged."""
    a, b = cache.layers[first], cache.layers[second]
    if not a.mergeable or not b.mergeable:
        raise NotImplementedError("MiniCache merges full-precision dense layers that nothing compressed yet, of single "
                                  "contexts or batches without padding")
    pair = MergedPair(a, b, interpolation, retention)
    cache.layers[first], cache.layers[second] = MergedLayer(pair, 0, a), MergedLayer(pair, 1, b)
