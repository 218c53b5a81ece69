import torch

from ..attention import attention_received
from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import Method


def accumulated_attention(ctx: LayerContext) -> torch.Tensor:
    """Attention each stored token received from this forward's queries, summed over them and averaged over the
    query heads of its KV head: [batch, kv_heads, stored] (one more attention pass, chunk by chunk)."""
    return attention_received(ctx.queries, ctx.keys, ctx.real, ctx.scaling, ctx.new_real) / ctx.group_size


class H2O(Method):
    """Keeps the heavy hitters (most attention accumulated over all queries so far) and the most recent tokens.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", NeurIPS 2023, arXiv:2306.14048. Every forward adds the attention its queries pay to each
    stored token; when a head holds more than `budget` tokens it keeps the last `recent_ratio` of the
    budget and, of the others, the highest accumulated attention (the paper splits the budget evenly).
    Acts at prefill and at every decoding step.
    """

    name = "h2o"
    phase = "both"

    budget: int = 512
    recent_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.budget <= 0 or not 0 <= self.recent_ratio <= 1:
            raise ValueError(f"H2O needs budget > 0 and recent_ratio in [0, 1]; got {self.budget}, {self.recent_ratio}")

    def compress(self, ctx: LayerContext) -> None:
        previous = ctx.recall("h2o")
        fresh = accumulated_attention(ctx)
        if previous is not None and previous.shape[-1] <= fresh.shape[-1]:
            fresh[..., : previous.shape[-1]] += previous
        ctx.remember("h2o", fresh)
        if int(ctx.held.max()) <= self.budget:
            return
        recent = int(self.budget * self.recent_ratio)
        scores = fresh.masked_fill(ctx.rank >= ctx.held[..., None] - recent, float("inf"))
        ctx.keep(top_k_per_head(scores, ctx.held.clamp(max=self.budget)))
