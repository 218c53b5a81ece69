
from ..context import LayerContext, last_queries_attention
from .base import Method


class SimLayerKV(Method):
    """Keeps only the initial and most recent tokens in "lazy" layers, everything in the others.

    Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction", arXiv:2410.13846.
    A layer is lazy when the last context token puts more than `lazy_threshold` of its attention
    (averaged over heads) on the first `n_initial` and last `n_recent` tokens; lazy layers then keep
    just those. The paper's thresholds: Llama-3 0.9 (the default), Llama-2 0.65, Mistral 0.8,
    Qwen 0.85. Detection uses the last context token at prefill (query-agnostic protocol).
    """

    name = "simlayerkv"

    lazy_threshold: float = 0.9
    n_initial: int = 4
    n_recent: int = 1024

    def compress(self, ctx: LayerContext) -> None:
        long_enough = ctx.held.amin(-1) > self.n_initial + self.n_recent  # [batch]: each row decides alone
        if not bool(long_enough.any()):
            return
        rank = ctx.rank
        edges = (rank >= 0) & ((rank < self.n_initial) | (rank >= ctx.held[..., None] - self.n_recent))
        attention = last_queries_attention(ctx, 1)[:, :, 0]  # [batch, heads, n]
        on_edges = (attention * edges.repeat_interleave(ctx.group_size, dim=1)).sum(-1)
        lazy = long_enough.to(on_edges.device) & (on_edges.mean(-1) > self.lazy_threshold)
        if bool(lazy.any()):
            ctx.keep(edges, rows=lazy)
