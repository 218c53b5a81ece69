import torch
import torch.nn.functional as F

from ..hooks import LayerContext
from .base import ScorerMethod


def pooled(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """Smooth scores along the tokens so that neighbours of an important token are kept with it."""
    pool = {"max": F.max_pool1d, "avg": F.avg_pool1d}[pooling]
    batch, heads, n = scores.shape
    out = pool(scores.reshape(batch * heads, 1, n), kernel_size, stride=1, padding=kernel_size // 2)
    return out.view(batch, heads, -1)[..., :n]


def snapkv_scores(ctx: LayerContext, window_size: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """Attention of the observation window (the last queries) on each earlier token, pooled; window kept."""
    window = min(window_size, ctx.n_new - 1, ctx.n_stored - 1)
    if window < 1:
        return torch.ones(ctx.keys.shape[:-1], device=ctx.keys.device)
    attention = ctx.last_queries_attention(window)[..., :-window]  # [batch, heads, window, earlier]
    scores = ctx.per_kv_head(pooled(attention.mean(dim=2), kernel_size, pooling))
    return F.pad(scores, (0, window), value=float("inf"))


class SnapKV(ScorerMethod):
    """Keeps the tokens the last `window_size` queries attend to most (pooled), plus that window, per head.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.
    Defaults are the paper's LongBench setting: a 32-token observation window and max pooling with
    kernel 7. Scores are averaged over the query heads that share a KV head. In kvsqueeze's default
    query-agnostic protocol the window is the end of the context, not the question.
    """

    name = "snapkv"

    def __init__(self, ratio=None, budget=None, window_size: int = 32, kernel_size: int = 7, pooling: str = "max"):
        super().__init__(ratio, budget)
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg'; got {pooling!r}")
        self.window_size, self.kernel_size, self.pooling = window_size, kernel_size, pooling

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)

    def settings(self):
        return {"window_size": self.window_size, "kernel_size": self.kernel_size, "pooling": self.pooling}
