import math

import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import ScorerMethod, as_scorer


def projected_value_norm(ctx: LayerContext, chunk: int = 512) -> torch.Tensor:
    """||v W_o^h||_1 for every stored token: how much each value moves the layer's output, [batch, kv_heads, n].

    W_o^h is the slice of the output projection that reads query head h; heads of a group are averaged.
    """
    projection = getattr(ctx.module, "o_proj", None)
    if projection is None:
        raise NotImplementedError(f"{type(ctx.module).__name__} has no o_proj: cannot project the values")
    n_heads = ctx.group_size * ctx.n_kv_heads
    weight = projection.weight.view(projection.weight.shape[0], n_heads, -1).permute(1, 2, 0).float()  # [H, d, out]
    values = ctx.values.float().repeat_interleave(ctx.group_size, dim=1)  # [b, H, n, d]
    norms = torch.cat([torch.einsum("bhnd,hdo->bhno", values[:, :, i:i + chunk], weight).abs().sum(-1)
                       for i in range(0, values.shape[2], chunk)], dim=2)
    return ctx.per_kv_head(norms)


class CriticalKV(ScorerMethod):
    """Keeps half of each head's budget by the base score, the rest by the score times the projected value norm.

    Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective",
    arXiv:2502.03805. Two stages per head: the `first_stage_ratio` of the budget goes to the highest
    base scores (SnapKV by default); the remaining budget to the highest (score + epsilon) * ||v W_o||_1,
    which bounds how much evicting the token perturbs the attention output.
    """

    name = "criticalkv"

    scorer: "str | ScorerMethod" = "snapkv"
    first_stage_ratio: float = 0.5
    epsilon: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.first_stage_ratio <= 1:
            raise ValueError(f"first_stage_ratio must be in [0, 1]; got {self.first_stage_ratio}")
        self.scorer = as_scorer(self.scorer)

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        scores = self.scorer.scores(ctx).float()
        counts = self.allocation.head_counts(scores, ctx.row_lengths, *ctx.depth).clamp(max=ctx.n_stored)
        first = top_k_per_head(scores, (counts * self.first_stage_ratio).floor().long())
        refined = (scores + self.epsilon) * projected_value_norm(ctx)
        refined = refined.masked_fill(first, math.inf)
        if ctx.real is not None:
            refined = refined.masked_fill(~ctx.real, -math.inf)
        return top_k_per_head(refined, counts)
