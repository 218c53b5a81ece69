import torch

from ..context import LayerContext, last_queries_attention
from .base import ScorerMethod


class TOVA(ScorerMethod):
    """Keeps the tokens the last token attends to most, averaged over all heads of the layer.

    Oren et al., "Transformers are Multi-State RNNs", arXiv:2401.06104 (Token Omission Via
    Attention). Scores are averaged across heads, so every head of a layer keeps the same tokens;
    the last token itself is always kept.
    """

    name = "tova"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = last_queries_attention(ctx, 1)[:, :, 0]  # [batch, heads, stored]
        scores = attention.mean(dim=1, keepdim=True).expand(-1, ctx.n_kv_heads, -1).clone()
        scores[..., -1] = float("inf")
        return scores
