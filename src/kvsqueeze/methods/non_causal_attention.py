import math

import torch
import torch.nn.functional as F

from ..context import LayerContext
from .base import ScorerMethod
from .leverage_score import by_row, z_scores


def chunked_column_sums(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Attention received by each key from all queries of its chunk, non-causally: [batch, heads, n].

    Queries and keys [batch, heads, n, dim] are cut into chunks of `chunk_size` tokens; within a chunk
    every query attends to every key (unscaled logits, as the authors do).
    """
    batch, heads, n, dim = keys.shape
    padded = math.ceil(n / chunk_size) * chunk_size
    pad = (0, 0, 0, padded - n)
    q, k = F.pad(queries.float(), pad).unflatten(2, (-1, chunk_size)), F.pad(keys.float(), pad).unflatten(2, (-1, chunk_size))
    logits = q @ k.transpose(-1, -2)  # [batch, heads, chunks, chunk, chunk]
    beyond = (torch.arange(padded, device=keys.device) >= n).view(-1, chunk_size)  # [chunks, chunk]
    weights = logits.masked_fill(beyond[:, None, :], float("-inf")).softmax(-1).masked_fill(beyond[..., None], 0)
    return weights.sum(-2).flatten(2)[..., :n]


def non_causal_scores(ctx: LayerContext, rows: slice, tokens: slice, chunk_size: int) -> torch.Tensor:
    """NonCausalAttention's scores (before standardisation) of the stored `tokens` of batch `rows` (a freshly
    prefilled layer: its tokens are this forward's, each with its query)."""
    keys = ctx.keys[rows, :, tokens].repeat_interleave(ctx.group_size, 1)
    received = ctx.per_kv_head(chunked_column_sums(ctx.queries[rows, :, tokens], keys, chunk_size))
    scores = received * ctx.values[rows, :, tokens].float().norm(dim=-1)
    return F.avg_pool1d(scores, kernel_size=3, stride=1, padding=1)


class NonCausalAttention(ScorerMethod):
    """Keeps the tokens that receive the most attention from every token of their chunk, times their value norm.

    Chari & Van Durme, "Compactor", arXiv:2507.08143: the context is cut into chunks of `chunk_size`
    (256, the authors'), attention within a chunk is computed without the causal mask, the attention each
    key receives is summed over the chunk's queries, averaged over the query heads of its KV head,
    weighted by the value norm, smoothed over 3 neighbours and z-scored per batch row. Prefill only.
    """

    name = "non_causal_attention"
    declares = frozenset({"whole_context"})

    chunk_size: int = 256

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return by_row(ctx, lambda rows, start: z_scores(non_causal_scores(ctx, rows, slice(start, None),
                                                                          self.chunk_size)))
