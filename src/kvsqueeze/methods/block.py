import torch

from ..context import LayerContext
from .base import ScorerMethod, ScorerWrapper
from .chunk import single_forward_rows, token_subset


class Block(ScorerWrapper):
    """Keeps, per head, the budget's best tokens as blocks of `block_size` tokens arrive: each block competes with what was kept so far.

    BlockPress of kvpress, simulating the block-wise prompt processing of KeyDiff (Park et al., "KeyDiff: Key
    Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
    Environments", arXiv:2504.15364): each head starts with the first `budget` tokens; then, block after
    block, the scorer scores the kept tokens plus the next block (as if the layer held only those) and
    the head keeps the best `budget` of them. The paper's scorer, KeyDiff, is the default; block_size=128
    is kvpress's default. A simulation within one forward: the whole context has already been attended to
    when the blocks are scored. kvsqueeze's real block-wise processing is chunked prefill
    (`compress(..., chunk_size=128)` with any method): there each chunk attends only to what was kept,
    and peak memory is bounded by the budget plus one chunk.
    """

    name = "block"
    declares = frozenset({"whole_context"})

    scorer: "str | ScorerMethod" = "keydiff"
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1; got {self.block_size}")

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        mask = torch.zeros(ctx.keys.shape[:-1], dtype=torch.bool, device=ctx.keys.device)
        for row, seen, tokens in single_forward_rows(ctx, "Block"):
            n_keep = min(self.allocation.n_keep(seen, *ctx.depth), len(tokens))
            for head in range(ctx.n_kv_heads):
                kept = tokens[:n_keep]
                for start in range(n_keep, len(tokens), self.block_size):
                    candidates = torch.cat([kept, tokens[start:start + self.block_size]])
                    scores = self.scorer.scores(token_subset(ctx, row, candidates, head))[0, 0]
                    best = scores.argsort(descending=True, stable=True)[:n_keep]  # ties: the oldest, as budgets do
                    kept = candidates[best.sort().values]  # in order, as the layer holds them
                mask[row, head, kept] = True
        return mask
