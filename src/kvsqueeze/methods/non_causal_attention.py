import torch
import torch.nn.functional as F

from ..context import LayerContext
from .base import ScorerMethod
from .leverage_score import by_row, z_scores


def chunked_column_sums(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Attention received by each key from all queries of its chunk, non-causally, averaged over the query heads of
    its KV head: [batch, kv_heads, n].

    Queries [batch, heads, n, dim] and keys [batch, kv_heads, n, dim] are cut into chunks of `chunk_size` tokens
    (the last one shorter); within a chunk every query attends to every key (unscaled logits, as the authors do).
    One chunk at a time (it stays in cache), grouped query heads against their shared keys. Unscaled logits put
    many weights below float32's normal range, where exp is several times slower: logits more than 87 below
    their row's maximum are raised to it (their weight, under 1e-38 of the row's largest, is 0 next to it).
    """
    batch, kv_heads, n, dim = keys.shape
    group = queries.shape[1] // kv_heads
    grouped, keys = queries.float().view(batch, kv_heads, group, n, dim), keys.float()
    received = torch.empty(batch, kv_heads, n, device=keys.device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = grouped[:, :, :, start:end] @ keys[:, :, None, start:end].transpose(-1, -2)  # [b, kv, group, c, c]
        logits = logits.clamp_(min=logits.amax(-1, keepdim=True) - 87.0)
        received[..., start:end] = logits.softmax(-1).sum(-2).mean(2)
    return received


def non_causal_scores(ctx: LayerContext, rows: slice, tokens: slice, chunk_size: int) -> torch.Tensor:
    """NonCausalAttention's scores (before standardisation) of the stored `tokens` of batch `rows` (a freshly
    prefilled layer: its tokens are this forward's, each with its query)."""
    received = chunked_column_sums(ctx.queries[rows, :, tokens], ctx.keys[rows, :, tokens], chunk_size)
    scores = received * ctx.values[rows, :, tokens].float().norm(dim=-1)
    return F.avg_pool1d(scores, kernel_size=3, stride=1, padding=1)


class NonCausalAttention(ScorerMethod):
    """Keeps the tokens that receive the most attention from every token of their chunk, times their value norm.

    Chari & Van Durme, "Compactor", arXiv:2507.08143: the context is cut into chunks of `chunk_size`
    (256, the authors'), attention within a chunk is computed without the causal mask, the attention each
    key receives is summed over the chunk's queries, averaged over the query heads of its KV head,
    weighted by the value norm, smoothed over 3 neighbours and z-scored per batch row. Prefill only.
    Inherent cost: attention within each chunk, without the causal mask (QKᵀ and softmax, no P·V), over the
    context's queries.
    """

    name = "non_causal_attention"
    declares = frozenset({"whole_context"})
    extra_work = ("chunk_attention",)

    chunk_size: int = 256

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return by_row(ctx, lambda rows, start: z_scores(non_causal_scores(ctx, rows, slice(start, None),
                                                                          self.chunk_size)))
