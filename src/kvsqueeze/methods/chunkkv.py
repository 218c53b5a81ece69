import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import ScorerWrapper


class ChunkKV(ScorerWrapper):
    """Keeps whole chunks of consecutive tokens: those a scorer rates highest, averaged over the chunk and the heads.

    Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
    Inference", arXiv:2502.00299. Tokens are grouped in chunks of `chunk_length` (the paper's best: 10);
    a chunk's score is the mean of the base scorer's scores over its tokens and the layer's KV heads, and
    the layer keeps its best chunks, as many as fit in the budget, the same in every head. The paper's
    base score is SnapKV's observation-window attention, the default scorer.
    """

    name = "chunkkv"

    chunk_length: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_length < 1:
            raise ValueError(f"chunk_length must be >= 1; got {self.chunk_length}")

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        scores, rank = self.scores(ctx).float(), ctx.rank
        valid = rank >= 0
        chunk = rank.clamp(min=0) // self.chunk_length  # chunks count real tokens: padding does not shift them
        n_chunks = int(chunk.max()) + 1
        totals = scores.new_zeros(*scores.shape[:2], n_chunks).scatter_add_(-1, chunk, scores.masked_fill(~valid, 0))
        counts = scores.new_zeros(totals.shape).scatter_add_(-1, chunk, valid.float())
        chunk_scores = (totals.sum(1) / counts.sum(1).clamp(min=1)).masked_fill(counts.sum(1) == 0, float("-inf"))
        budget = torch.tensor([self.allocation.n_keep(int(n), *ctx.depth) for n in ctx.row_lengths], device=scores.device)
        kept_chunks = top_k_per_head(chunk_scores[:, None], (budget // self.chunk_length).clamp(min=1)[:, None])
        return kept_chunks[:, 0].gather(-1, chunk.flatten(1)).view(chunk.shape) & valid
