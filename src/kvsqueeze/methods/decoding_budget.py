import torch

from ..budgets import top_k_per_head
from ..hooks import LayerContext
from .base import Method, as_scorer


class DecodingBudget(Method):
    """Keeps the cache within `budget` tokens per head while generating: every `interval` steps, the best by a scorer.

    Decode-time compression with any scorer (kvpress's DecodingPress): once a head holds `budget +
    interval` tokens, the scorer's top `budget` are kept, so the cache never holds more than budget +
    interval tokens during generation. Combine it with a prefill method through
    `ctx.ask(..., decode_method=...)`; the question's own forward is not compressed.
    """

    name = "decoding_budget"
    phase = "decode"

    def __init__(self, scorer="knorm", budget: int = 512, interval: int = 16):
        if budget <= 0 or interval <= 0:
            raise ValueError(f"budget and interval must be positive; got {budget}, {interval}")
        self.scorer, self.target, self.interval = as_scorer(scorer), budget, interval

    def setup(self, model):
        self.scorer.setup(model)

    def compress(self, ctx: LayerContext) -> None:
        if int(ctx.held.max()) < self.target + self.interval:
            return
        counts = ctx.held.clamp(max=self.target)
        ctx.keep(top_k_per_head(self.scorer.scores(ctx), counts))

    def describe(self):
        return {"scorer": self.scorer.name, "budget": self.target, "interval": self.interval}
