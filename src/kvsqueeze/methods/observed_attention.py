import torch

from ..hooks import LayerContext
from .base import ScorerMethod


class MissingAttentionWeights(RuntimeError):
    """The model did not return attention weights."""


class ObservedAttention(ScorerMethod):
    """Keeps the tokens that received the most attention from the context's own queries, per head.

    The accumulated-attention criterion of H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
    Generative Inference of Large Language Models", NeurIPS 2023, arXiv:2306.14048), applied once
    after prefill. Each token's accumulated attention is divided by the number of queries that could
    see it, so early tokens are not favoured merely for being early. Needs the attention weights:
    load the model with `attn_implementation="eager"`.
    """

    name = "observed_attention"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if ctx.attention_weights is None:
            raise MissingAttentionWeights(
                "ObservedAttention needs the attention weights, which only eager attention returns: load the "
                "model with attn_implementation='eager' (or model.set_attn_implementation('eager'))")
        weights = ctx.attention_weights.float()  # [batch, heads, new, stored]
        if ctx.new_real is not None:  # padding queries attend to nothing real
            weights = weights * ctx.new_real[:, None, :, None]
        stored, new = weights.shape[-1], weights.shape[-2]
        seen_by = torch.arange(stored, device=weights.device)
        seen_by = (new - (seen_by - (stored - new)).clamp(min=0)).float()
        return ctx.per_kv_head(weights.sum(dim=2) / seen_by)
