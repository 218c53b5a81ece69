import torch

from ..context import LayerContext
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
    declares = frozenset({"attention_weights"})

    def score(self, ctx: LayerContext) -> torch.Tensor:
        weights = ctx.attention_weights
        if weights is None:
            raise MissingAttentionWeights(
                "ObservedAttention needs the attention weights, which only eager attention returns: load the "
                "model with attn_implementation='eager' (or model.set_attn_implementation('eager'))")
        weights = weights.float()  # [batch, heads, new, stored]
        stored, new = weights.shape[-1], weights.shape[-2]
        if ctx.new_real is None:  # every query is real; a token is seen by all the new ones or those after it
            received = weights.sum(dim=2)
            seen_by = (stored - torch.arange(stored, device=weights.device)).clamp(max=new)[None]
        else:  # padding queries attend to nothing real, and see nothing
            real = ctx.new_real.to(weights.dtype)
            received = torch.einsum("bhqs,bq->bhs", weights, real)
            visible = torch.arange(stored, device=weights.device)[None, :] <= (
                stored - new + torch.arange(new, device=weights.device))[:, None]
            seen_by = (real[:, :, None] * visible).sum(1).clamp(min=1)  # [batch, stored]
        return ctx.per_kv_head(received / seen_by[:, None, :])
