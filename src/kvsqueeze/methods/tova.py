import torch

from ..hooks import LayerContext
from .base import ScorerMethod


class TOVA(ScorerMethod):
    """Keeps the tokens the last token attends to most, averaged over all heads of the layer.

    Oren et al., "Transformers are Multi-State RNNs", arXiv:2401.06104 (Token Omission Via
    Attention). Scores are averaged across heads, so every head of a layer keeps the same tokens;
    the last token itself is always kept.
    """

    name = "tova"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        attention = ctx.last_queries_attention(1)[:, :, 0]  # [batch, heads, stored]
        scores = attention.mean(dim=1, keepdim=True).expand(-1, ctx.n_kv_heads, -1).clone()
        scores[..., -1] = float("inf")
        return scores
