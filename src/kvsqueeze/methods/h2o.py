import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import Method


def accumulated_attention(ctx: LayerContext, chunk: int = 256) -> torch.Tensor:
    """Attention each stored token received from the new queries, summed over them: [batch, kv_heads, stored].

    Computed from the observed queries, a chunk of queries at a time (no n x n matrix), causal for new tokens.
    """
    queries = ctx.queries
    keys = ctx.keys.repeat_interleave(ctx.group_size, dim=1)
    stored, new = keys.shape[2], queries.shape[2]
    total = torch.zeros(keys.shape[:3], device=keys.device)
    for start in range(0, new, chunk):
        block = queries[:, :, start:start + chunk]
        logits = (block @ keys.transpose(-1, -2)).float() * ctx.scaling
        position = torch.arange(start, start + block.shape[2], device=keys.device) + stored - new
        logits = logits.masked_fill(torch.arange(stored, device=keys.device)[None, :] > position[:, None],
                                    float("-inf"))
        if ctx.real is not None:
            real = ctx.real.repeat_interleave(ctx.group_size, dim=1)[:, :, None, :]
            logits = logits.masked_fill(~real, float("-inf"))
        weights = logits.softmax(-1).nan_to_num(0.0)  # a padding query sees nothing: no weights
        if ctx.new_real is not None:
            weights = weights * ctx.new_real[:, None, start:start + block.shape[2], None]
        total += weights.sum(2)
    return ctx.per_kv_head(total)


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
