import math

import torch

from ..context import LayerContext
from .chunkkv import ChunkKV


def normalized_entropy(scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Entropy of each chunk's scores [chunks, length] (unused slots NaN), over log(chunk size), in [0, 1].

    Scores are shifted to be non-negative when a chunk holds a negative one; a one-token chunk has entropy 0.
    """
    present = ~scores.isnan()
    low = scores.nan_to_num(float("inf")).amin(-1, keepdim=True).clamp(max=0)
    shifted = (scores - low).masked_fill(~present, 0)
    p = shifted / (shifted.sum(-1, keepdim=True) + 1e-8)
    entropy = -(p * (p + 1e-8).log()).sum(-1)
    return (entropy / sizes.float().log().clamp(min=1e-8)).clamp(0, 1).masked_fill(sizes <= 1, 0.0)


def gated_chunk_selection(scores: torch.Tensor, chunk_length: int, spiky_length: int, budget: int) -> torch.Tensor:
    """Keep-mask over one sequence's token `scores` [n] (finite): `budget` tokens, by chunks, spiky chunks trimmed.

    Chunks are visited by mean score, best first, each taking what is left of the budget; a chunk in the
    top half by mean score and the bottom half by normalized entropy (a single token carries it) takes
    only its `spiky_length` best tokens. Budget left at the end goes to the best tokens not yet kept.
    """
    n = scores.shape[0]
    n_chunks = math.ceil(n / chunk_length)
    padded = torch.full((n_chunks * chunk_length,), float("nan"), device=scores.device)
    padded[:n] = scores
    chunks = padded.view(n_chunks, chunk_length)
    sizes = (~chunks.isnan()).sum(-1)
    means = chunks.nan_to_num(0).sum(-1) / sizes
    entropy = normalized_entropy(chunks, sizes)
    spiky = (means >= means.median()) & (entropy < entropy.median())
    wanted = torch.where(spiky, sizes.clamp(max=spiky_length), sizes)

    order = means.argsort(descending=True, stable=True)
    before = wanted[order].cumsum(0) - wanted[order]  # budget spent by better chunks
    taken = torch.empty_like(wanted)
    taken[order] = (budget - before).clamp(min=0).minimum(wanted[order])
    # rank of each token within its chunk, best first
    within = chunks.nan_to_num(float("-inf")).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    keep = (within < taken[:, None]).flatten()[:n]
    missing = budget - int(keep.sum())
    if missing > 0:
        leftover = scores.masked_fill(keep, float("-inf"))
        keep[leftover.topk(missing).indices] = True
    return keep


class EntropyGatedChunkKV(ChunkKV):
    """Keeps whole chunks a scorer rates highest, but only the best few tokens of chunks carried by a single token.

    ChunkKV (Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
    LLM Inference", arXiv:2502.00299) with the entropy gate of NVIDIA kvpress's EntropyGatedChunkKVPress:
    a chunk's tokens are scored by the base scorer averaged over the layer's KV heads; chunks in the top
    half by mean score whose normalized score entropy is in the bottom half ("spiky") keep only their
    `low_entropy_chunk_length` best tokens, and the budget freed goes to further chunks, then to the best
    remaining tokens, so that exactly the budget is kept. Defaults are kvpress's (chunks of 10, 4 tokens
    of a spiky chunk, SnapKV scores); the same tokens are kept in every head.
    """

    name = "entropy_gated_chunkkv"

    low_entropy_chunk_length: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.low_entropy_chunk_length < self.chunk_length:
            raise ValueError("low_entropy_chunk_length must be in [1, chunk_length); "
                             f"got {self.low_entropy_chunk_length} with chunk_length {self.chunk_length}")

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        scores, rank = self.scores(ctx).float(), ctx.rank
        valid = rank >= 0
        # tokens are aligned by their rank among the real ones, so heads and padded rows share one selection
        slot = rank.clamp(min=0).flatten(1)
        n_slots = int(slot.max()) + 1
        # a window scored +inf counts as the best finite token, so that chunk means and entropies stay finite
        finite = scores.masked_fill(~valid, 0).nan_to_num(posinf=0.0)
        best = finite.masked_fill(~valid | scores.isinf(), float("-inf")).amax(dim=(1, 2), keepdim=True)
        finite = torch.where(scores == float("inf"), best.clamp(min=0) + 1, finite)
        totals = scores.new_zeros(scores.shape[0], n_slots).scatter_add_(-1, slot, finite.flatten(1))
        counts = scores.new_zeros(totals.shape).scatter_add_(-1, slot, valid.flatten(1).float())
        keep = torch.zeros(totals.shape, dtype=torch.bool, device=scores.device)
        for b, seen in enumerate(ctx.row_lengths.tolist()):
            n = int((counts[b] > 0).sum())
            budget = max(1, min(self.allocation.n_keep(seen, *ctx.depth), n))
            keep[b, :n] = gated_chunk_selection(totals[b, :n] / counts[b, :n], self.chunk_length,
                                                self.low_entropy_chunk_length, budget)
        return keep.gather(-1, slot).view(rank.shape) & valid
