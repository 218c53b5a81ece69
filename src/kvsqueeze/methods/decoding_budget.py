
from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import Method, ScorerMethod, as_scorer


class DecodingBudget(Method):
    """Keeps the cache within `budget` tokens per head while generating: every `interval` steps, the best by a scorer.

    Decode-time compression with any scorer (kvpress's DecodingPress): once a head holds `budget +
    interval` tokens, the scorer's top `budget` are kept, so the cache never holds more than budget +
    interval tokens during generation. Combine it with a prefill method through
    `ctx.ask(..., decode_method=...)`; the question's own forward is not compressed.
    """

    name = "decoding_budget"
    phase = "decode"

    scorer: "str | ScorerMethod" = "knorm"
    budget: int = 512
    interval: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.budget <= 0 or self.interval <= 0:
            raise ValueError(f"budget and interval must be positive; got {self.budget}, {self.interval}")
        self.scorer = as_scorer(self.scorer)

    def compress(self, ctx: LayerContext) -> None:
        if int(ctx.held.max()) < self.budget + self.interval:
            return
        counts = ctx.held.clamp(max=self.budget)
        ctx.keep(top_k_per_head(self.scorer.scores(ctx), counts))
