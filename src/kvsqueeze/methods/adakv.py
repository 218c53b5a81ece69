import math

import torch

from ..budgets import Budget, Uniform, largest_remainder
from .base import ScorerWrapper


class HeadAdaptive(Budget):
    """AdaKV's allocation: the heads of a layer share their total budget according to their scores.

    With a uniform per-head budget k, the layer's h*k highest scores over all heads count c_h per head;
    head h then keeps floor(alpha*k) + (1 - alpha)*c_h tokens (rounded to the exact total), so every
    head keeps at least the safeguard floor(alpha*k) (Feng et al., arXiv:2407.11550, alpha = 0.2).
    """

    def __init__(self, base: Uniform, alpha: float = 0.2):
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha_safeguard must be in [0, 1]; got {alpha}")
        self.base, self.alpha = base, alpha

    def n_keep(self, n_tokens, layer_idx=0, n_layers=1):
        return self.base.n_keep(n_tokens)

    def adaptive_counts(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """AdaKV's per-head counts for one per-head budget k, for every batch row."""
        batch, heads, n = scores.shape
        # stable: ties (e.g. windows scored +inf) break by head then position, however the row is padded
        top = scores.reshape(batch, heads * n).argsort(dim=-1, descending=True, stable=True)[:, :heads * k]
        chosen = torch.zeros(batch, heads, device=scores.device).scatter_add_(
            1, top // n, torch.ones(top.shape, device=scores.device))
        floor_share = math.floor(self.alpha * k)
        shares = (1 - self.alpha) * chosen
        total = torch.full((batch,), heads * (k - floor_share), device=scores.device)
        return (floor_share + largest_remainder(shares, total)).clamp(max=n)

    def head_counts(self, scores, seen, layer_idx=0, n_layers=1):
        # each row's tokens (padding, scored -inf, left out) packed to the left: ranked as they would be alone
        real = scores > float("-inf")
        packed = scores.gather(-1, (~real).long().argsort(dim=-1, stable=True))
        held = real.sum(-1).amax(-1).clamp(min=1).tolist()
        rows = [self.adaptive_counts(packed[b:b + 1, :, :held[b]], min(self.n_keep(int(n)), held[b]))
                for b, n in enumerate(seen)]
        return torch.cat(rows)

    def describe(self) -> dict:
        return self.base.describe() | {"alpha_safeguard": self.alpha}


class AdaKV(ScorerWrapper):
    """Keeps a layer's highest-scoring tokens across all its heads, each head keeping at least a safeguard share.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
    Inference", arXiv:2407.11550. The layer's budget (`ratio` / `budget` per head, times the heads)
    goes to its globally highest scores; head h then keeps floor(alpha*k) + (1 - alpha)*c_h tokens,
    c_h being its share of the global top, as in the authors' code (alpha_safeguard = 0.2). Heads keep
    different numbers of tokens, stored ragged, so the memory is really freed. Any scorer works; the
    paper's is SnapKV (window 32, max pooling, kernel 7), the default.
    """

    name = "adakv"

    alpha_safeguard: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        self.allocation = HeadAdaptive(self.allocation, self.alpha_safeguard)
