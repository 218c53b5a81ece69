from dataclasses import dataclass, fields

import torch

from ..hooks import LayerContext, rotate_half
from ..ragged import RaggedLayer
from .base import Method


def rerotated_keys(ctx: LayerContext, keep: torch.Tensor) -> torch.Tensor:
    """The stored keys with each token of `keep` [batch, kv_heads, stored] moved forward by the number of tokens
    evicted after it in its (row, head): the kept tokens then sit at consecutive positions ending where the
    real ones ended. Other tokens are returned as they are.

    Needs each (row, head)'s real tokens to sit at consecutive positions, as a prefill leaves them and as this
    re-rotation leaves them (the tokens that come later follow on).
    """
    keys, real = ctx.keys, ctx.real
    evicted = ~keep if real is None else real & ~keep
    shift = torch.where(keep, evicted.sum(-1, keepdim=True) - evicted.cumsum(-1), 0)
    if not bool(shift.any()):
        return keys
    shifts, where = shift.unique(return_inverse=True)
    cos, sin = (t[0].float() for t in ctx.rotary_at(torch.cat([shifts.new_zeros(1), shifts])))
    scale = cos[0, 0]  # the model's attention scaling, cos at position 0: a rotation has none
    cos, sin = cos[1:][where] / scale, sin[1:][where] / scale
    width = cos.shape[-1]
    rotated = keys[..., :width].float()
    rotated = rotated * cos + rotate_half(rotated) * sin
    return torch.cat([rotated.to(keys.dtype), keys[..., width:]], dim=-1)


@dataclass
class RerotatingContext(LayerContext):
    """A LayerContext whose `keep` re-rotates the kept keys (see `rerotated_keys`) before the others are freed."""

    @classmethod
    def of(cls, ctx: LayerContext) -> "RerotatingContext":
        return cls(**{f.name: getattr(ctx, f.name) for f in fields(ctx)})

    def keep(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        mask = self.in_rows(mask, rows)
        if self.real is not None:
            mask = mask & self.real
        layer = self.layer
        if isinstance(layer, RaggedLayer) and layer.key_channels is not None:
            self.prune_key_channels(layer.key_channels)
        keys = rerotated_keys(self, mask)
        if isinstance(layer, RaggedLayer):  # packed pages: repack the kept tokens with their new keys
            self.cache.layers[self.layer_idx] = RaggedLayer.from_dense(
                keys, self.values, mask, layer.seen, codec=layer.codec).inherit(layer)
        else:
            layer.keys = keys  # a new tensor: forks of the cache keep theirs
            self.cache.keep(self.layer_idx, mask)

    def prune_key_channels(self, channels: torch.Tensor) -> None:
        raise NotImplementedError("keys whose channels are pruned cannot be re-rotated: KeyRerotation wraps methods "
                                  "that evict tokens")


class KeyRerotation(Method):
    """Keeps what the wrapped method keeps, its kept keys re-rotated to consecutive positions, next to the later tokens.

    The key re-rotation of kvpress's KeyRerotationPress and of Finch (Corallo & Papotti, "FINCH: Prompt-guided
    Key-Value Cache Compression for Large Language Models", TACL 2024, arXiv:2408.00167), as StreamingLLM's
    rolling cache does (Xiao et al., arXiv:2309.17453): after eviction the gaps left by evicted tokens are
    closed, so the question and the answer follow the kept tokens directly. Each kept key moves forward by
    the number of tokens evicted after it in its head (its RoPE rotation is undone and redone at the new
    position, in one rotation by the difference). Since rotary attention depends only on the distance
    between a query and a key, this is the same attention as kvpress's kept keys at 0..kept-1 followed by
    the next token at position `kept`, and it needs no change to positions: every head, even with its own
    number of kept tokens (AdaKV), every layer, and the model's sliding-window layers agree on where the
    next token is. Wraps any method that evicts tokens (a registry name, built with `ratio`/`budget`, or
    an instance), at any phase; not key-channel pruning (ThinK), nor methods that evict after the prefill
    (KVzip, KVCompose).
    """

    name = "key_rerotation"

    def __init__(self, ratio=None, budget=None, method: "str | Method" = "snapkv"):
        if isinstance(method, str):
            from . import build

            method = build(method, ratio=ratio, budget=budget)
        elif ratio is not None or budget is not None:
            raise ValueError("give ratio / budget to the wrapped method itself when it is an instance")
        if method.decides_after_prefill():
            raise ValueError(f"KeyRerotation cannot wrap {type(method).__name__}: it evicts after the prefill, from the "
                             "whole cache, where no keys can be re-rotated")
        self.method = method
        self.phase = method.phase
        self.needs_whole_context = method.needs_whole_context
        self.changes_prefill = method.changes_prefill

    def setup(self, model):
        self.method.setup(model)

    def before_forward(self, kwargs):
        self.method.before_forward(kwargs)

    def acts_on(self, ctx: LayerContext) -> bool:
        return self.method.acts_on(ctx)

    def compress(self, ctx: LayerContext) -> None:
        self.method.compress(RerotatingContext.of(ctx))

    def attend(self, module, query, key, value, mask, attend, **kwargs):
        return self.method.attend(module, query, key, value, mask, attend, **kwargs)

    def overrides_attention(self) -> bool:
        return self.method.overrides_attention()

    def describe(self):
        return {"method": self.method}
