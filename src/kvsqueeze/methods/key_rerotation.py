import torch

from ..context import LayerContext, rotate
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
    cos, sin = (t[0].float() for t in ctx.rope.at(torch.cat([shifts.new_zeros(1), shifts])))
    scale = cos[0, 0]  # the model's attention scaling, cos at position 0: a rotation has none
    cos, sin = (cos[1:] / scale)[where], (sin[1:] / scale)[where]  # per token: [batch, kv_heads, stored, rotary]
    return rotate(keys.float(), cos, sin).to(keys.dtype)


class RerotatingContext(LayerContext):
    """A LayerContext whose `keep` re-rotates the kept keys (see `rerotated_keys`) as the others are freed."""

    @classmethod
    def of(cls, ctx: LayerContext) -> "RerotatingContext":
        return cls(ctx.module, ctx.cache, ctx.hidden_states, ctx.position_embeddings, ctx.attention_weights,
                   ctx.observed_queries, ctx.rotary_embedding)

    def keep(self, mask, rows=None, keys=None, values=None) -> None:
        if keys is not None:
            raise NotImplementedError("KeyRerotation wraps methods that keep tokens as they are")
        if self.layer.key_channels is not None:
            self.prune_key_channels(self.layer.key_channels)
        mask = self.in_rows(mask, rows)
        if self.real is not None:
            mask = mask & self.real
        super().keep(mask, keys=rerotated_keys(self, mask), values=values)

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

    ratio: float | None = None
    budget: int | None = None
    method: "str | Method" = "snapkv"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.method, str):
            from . import build

            self.method = build(self.method, ratio=self.ratio, budget=self.budget)
        elif self.ratio is not None or self.budget is not None:
            raise ValueError("give ratio / budget to the wrapped method itself when it is an instance")
        self.ratio = self.budget = None  # they are the wrapped method's
        if self.method.has("after_prefill"):
            raise ValueError(f"KeyRerotation cannot wrap {type(self.method).__name__}: it evicts after the prefill, "
                             "from the whole cache, where no keys can be re-rotated")
        self.phase = self.method.phase

    def acts_on(self, ctx: LayerContext) -> bool:
        return self.method.acts_on(ctx)

    def compress(self, ctx: LayerContext) -> None:
        self.method.compress(RerotatingContext.of(ctx))
