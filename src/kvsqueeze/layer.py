"""What every kvsqueeze cache layer answers for itself, whatever its kind.

A kind (dense evicting, ragged, merged pair, sliding window; quantized through its quantizer) is a
subclass that overrides only what differs, as transformers' own layers do. The cache, the attention
function and the methods talk to layers through this interface alone: whether the layer is
compressible, `keep(mask)` (with new contents, for methods that transform what they keep),
`prune_key_channels`, `dense_view()` for scorers, `attend` (how attention reads it), `nbytes()`,
`fork()`, per-token state a method keeps (`remember` / `recall`), and saving.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch


KINDS: dict[str, type] = {}  # every layer kind by its `kind`, to rebuild saved layers


class CacheLayer:
    """What every kvsqueeze layer reports about the memory it really holds, now and at its largest, and how it is
    saved: `saved_tensors` and `saved_numbers` name the attributes a saved context stores (None tensors are left
    out), `kind` names the layer class in the file."""

    kind: ClassVar[str] = ""
    compressible: ClassVar[bool] = False  # methods compress it (else it is bounded by the model itself)
    saved_tensors: ClassVar[tuple[str, ...]] = ("keys", "values")
    saved_numbers: ClassVar[tuple[str, ...]] = ("peak_bytes",)
    peak_bytes = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            KINDS[cls.kind] = cls

    @property
    def stored(self) -> int:
        """Tokens physically held (the longest head's)."""
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

    def fork(self) -> "CacheLayer":
        """A copy sharing every tensor: a layer replaces its tensors, never edits them, so updating one leaves the
        other as it was."""
        return copy.copy(self)

    def attend(self, call) -> tuple[torch.Tensor, torch.Tensor | None]:
        """How attention reads this layer: by default, the model's own attention function as the model called it
        (`call`: an `attention.AttentionCall`)."""
        return call.run()

    def kept_per_head(self) -> torch.Tensor:
        """Tokens held per (batch row, KV head)."""
        if not self.stored:
            return torch.zeros(0, 0, dtype=torch.long)
        batch, heads, stored, _ = self.keys.shape
        return torch.full((batch, heads), stored, dtype=torch.long)

    # -- saving --

    def to_saved(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, numbers) to write in a saved context."""
        tensors = {name: getattr(self, name) for name in self.saved_tensors if getattr(self, name, None) is not None}
        if tensors.get("keys") is not None and tensors["keys"].numel() == 0:
            del tensors["keys"], tensors["values"]
        return tensors, {name: getattr(self, name) for name in self.saved_numbers}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], numbers: dict) -> "CacheLayer":
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


def allowed_columns(mask: torch.Tensor | None, fresh: int) -> torch.Tensor | None:
    """Which of a layer's `fresh` most recent tokens each query may see, as a bool [batch, 1, q or 1, fresh].

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


class CompressibleLayer(CacheLayer):
    """A layer methods compress, and what it knows about its tokens besides the tensors.

    - `seen`: the logical length (tokens the model has seen, padding included);
    - `fresh`: how many of the stored tokens arrived after the last compression. Their columns of the
      mask transformers builds are exact (padding and causality); all older stored tokens are kept
      context tokens, always visible;
    - `fresh_valid` [batch, fresh]: which fresh tokens are real, not padding (None: all), as attention
      reads it from the mask; `pads` [batch]: padding tokens seen per row.
    Padding is never kept by a compression, so a row's logical length is `seen - pads`.
    """

    compressible = True
    seen = 0
    fresh_valid: torch.Tensor | None = None
    pads: torch.Tensor | None = None
    quantizer = None  # a Quantizer: what the layer keeps is stored quantized
    key_channels: torch.Tensor | None = None  # the key channels kept, when some were pruned (ThinK)
    mergeable = False  # whether MiniCache may merge the layer with another (see `merged.merge_pair`)

    # -- what a method asks of the layer; each returns the layer that holds the result (this one, or a new one) --

    def keep(self, mask: torch.Tensor, keys: torch.Tensor | None = None,
             values: torch.Tensor | None = None) -> CacheLayer:
        """Keep the tokens of `dense_view()` where `mask` [batch, kv_heads, stored] is True and free the others;
        with `keys` / `values` (the dense view's shape), the kept tokens take these contents (methods that merge
        evicted tokens into kept ones, or re-rotate kept keys)."""
        raise NotImplementedError

    def prune_key_channels(self, channels: torch.Tensor) -> CacheLayer:
        """Keep only `channels` [batch, kv_heads, kept_dim] of the stored keys."""
        raise NotImplementedError

    def quantized(self) -> CacheLayer:
        """The layer holding these tokens as its quantizer stores them (this one when they already are)."""
        return self

    def dense_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(keys, values, real) [batch, kv_heads, stored, dim]: what the layer holds, shown dense for scorers;
        `real` [batch, kv_heads, stored] marks real tokens (None: all are)."""
        raise NotImplementedError

    def remember(self, name: str, per_token: torch.Tensor) -> None:
        """Keep per-token values [batch, kv_heads, stored] a method accumulates (H2O's attention), under `name`;
        they follow the tokens when the layer evicts. Replaced, never edited: forks keep their own."""
        self.token_state = {**getattr(self, "token_state", {}), name: per_token}

    def recall(self, name: str) -> torch.Tensor | None:
        """What `remember` kept under `name` for the tokens still held, if anything."""
        return getattr(self, "token_state", {}).get(name)

    # -- padding and lengths --

    def check(self) -> None:
        super().check()
        batch, heads = self.kept_per_head().shape
        if self.fresh_valid is not None and tuple(self.fresh_valid.shape) != (batch, self.fresh):
            raise ValueError("the padding mask does not match the stored tokens")
        if self.pads is not None and tuple(self.pads.shape) != (batch,):
            raise ValueError("the padding counts do not match the batch")
        if not 0 <= self.fresh <= self.stored or self.stored > self.seen:
            raise ValueError(f"inconsistent lengths: {self.stored} stored, {self.fresh} fresh, {self.seen} seen")

    def observe(self, mask: torch.Tensor | None, n_new: int) -> torch.Tensor | None:
        """Take from the attention mask which fresh tokens are real (the last `n_new` being this forward's); the
        padding the layer already knew of among its older fresh tokens stays padding (a stacked context's shorter
        tail: the mask cannot know of it). Returns what each query may see of the fresh tokens, [batch, 1, q or 1,
        fresh] (None: everything, causality aside)."""
        allowed = allowed_columns(mask, self.fresh)
        valid = None if allowed is None else allowed[:, 0, -1, :]
        known = self.fresh_valid
        if known is not None:
            valid = torch.ones(known.shape[0], self.fresh, dtype=torch.bool) if valid is None else valid.clone()
            valid[:, : known.shape[1]] &= known.to(valid.device)
            real = known.new_ones(known.shape[0], self.fresh)
            real[:, : known.shape[1]] = known
            real = real.to(valid.device)[:, None, None, :]
            allowed = real if allowed is None else allowed & real
        if valid is not None and bool(valid.all()):
            valid = None
        if valid is not None:
            new_pads = (~valid[:, -n_new:]).sum(-1)
            self.pads = new_pads if self.pads is None else self.pads + new_pads
        self.fresh_valid = valid
        return allowed

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

    def fresh_real(self, batch: int, heads: int, device) -> torch.Tensor:
        """[batch, heads, fresh] validity of the fresh tokens (all True without padding)."""
        if self.fresh_valid is None:
            return torch.ones(batch, heads, self.fresh, dtype=torch.bool, device=device)
        return self.fresh_valid[:, None, :].expand(batch, heads, -1).to(device)
