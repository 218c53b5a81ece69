import torch

from ..context import LayerContext
from .base import ScorerMethod
from .leverage_score import by_row, leverage_scores, z_scores
from .non_causal_attention import non_causal_scores


class Compactor(ScorerMethod):
    """Keeps sinks, the last tokens, and the best blend of key leverage and non-causal chunked attention.

    Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
    Leverage Scores", arXiv:2507.08143. Between the first `sink_size_start` (8) and last `sink_size_end`
    (4) tokens, which are always kept, a token scores `blending` x its z-scored leverage (LeverageScore)
    plus its z-scored non-causal attention (NonCausalAttention). As in the authors' kvpress
    implementation, `blending` defaults to the compression ratio (0.35 with a token budget). Prefill only.
    Inherent cost: attention within each chunk, without the causal mask (QKᵀ and softmax, no P·V), over the
    context's queries.
    """

    name = "compactor"
    declares = frozenset({"whole_context"})
    extra_work = ("chunk_attention",)

    sink_size_start: int = 8
    sink_size_end: int = 4
    chunk_size: int = 256
    sketch_dimension: int = 48
    blending: float | None = None
    seed: int = 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        blending = self.blending if self.blending is not None else (self.ratio or 0.35)
        keys = ctx.rope.keys

        def blend(rows, start):
            n = ctx.n_stored - start
            first = min(self.sink_size_start, n)
            last = min(self.sink_size_end, n - first)
            middle = slice(start + first, ctx.n_stored - last)
            scores = torch.zeros(keys[rows].shape[:2] + (n,), device=keys.device)
            if n - last > first:
                leverage = z_scores(leverage_scores(keys[rows, :, middle], self.sketch_dimension, self.seed))
                attention = z_scores(non_causal_scores(ctx, rows, middle, self.chunk_size))
                scores[..., first:n - last] = blending * leverage + attention
            protected = scores.max() + 1
            scores[..., :first], scores[..., n - last:] = protected, protected
            return scores

        return by_row(ctx, blend)
