import math

import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import ScorerMethod, as_scorer


def projected_value_norm(ctx: LayerContext, chunk: int = 256) -> torch.Tensor:
    """||v W_o^h||_1 for every stored token: how much each value moves the layer's output, [batch, kv_heads, n].

    W_o^h is the slice of the output projection that reads query head h; heads of a group are averaged. This costs
    one more output projection of the context (the method's inherent extra work): each KV head's values against
    its group's slices side by side (one matrix product, no values repeated), `chunk` tokens at a time into one
    buffer (it stays in cache, and no fresh pages are mapped for it).
    """
    projection = getattr(ctx.module, "o_proj", None)
    if projection is None:
        raise NotImplementedError(f"{type(ctx.module).__name__} has no o_proj: cannot project the values")
    batch, kv_heads, n, dim = ctx.values.shape
    group, out = ctx.group_size, projection.weight.shape[0]
    weight = projection.weight.detach().float().view(out, kv_heads, group, dim).permute(1, 3, 2, 0).reshape(
        kv_heads, dim, group * out)  # [kv, d, group x out]
    values = ctx.values.float().transpose(0, 1).reshape(kv_heads, batch * n, dim)
    norms = torch.empty(kv_heads, batch * n, group, device=values.device)
    buffer = torch.empty(min(chunk, batch * n), group * out, device=values.device)
    for head in range(kv_heads):
        for i in range(0, batch * n, chunk):
            part = values[head, i:i + chunk]
            projected = torch.mm(part, weight[head], out=buffer[:len(part)])
            norms[head, i:i + chunk] = projected.abs_().view(len(part), group, out).sum(-1)
    return norms.mean(-1).view(kv_heads, batch, n).transpose(0, 1)


class CriticalKV(ScorerMethod):
    """Keeps half of each head's budget by the base score, the rest by the score times the projected value norm.

    Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation Perspective",
    arXiv:2502.03805. Two stages per head: the `first_stage_ratio` of the budget goes to the highest
    base scores (SnapKV by default); the remaining budget to the highest (score + epsilon) * ||v W_o||_1,
    which bounds how much evicting the token perturbs the attention output. Inherent cost: one more output
    projection (o_proj) of the context's values, per query head.
    """

    name = "criticalkv"
    extra_work = ("output_projection",)

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
