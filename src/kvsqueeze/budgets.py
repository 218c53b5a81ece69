"""How many tokens a layer keeps, and where: the budget side of a method, separate from its scores.

A budget turns scores ([batch, kv_heads, tokens], higher = keep) into a keep-mask of the same shape.
Scorers never hard-code a budget; they are given one (`ratio=` or `budget=`).
"""

from __future__ import annotations

import math

import torch


def check_ratio(ratio: float) -> float:
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio is the fraction of tokens removed and must be in [0, 1); got {ratio}")
    return float(ratio)


def check_tokens(tokens: int) -> int:
    if int(tokens) != tokens or tokens <= 0:
        raise ValueError(f"budget is the number of tokens kept and must be a positive integer; got {tokens}")
    return int(tokens)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores of every (batch row, head)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)


class Budget:
    """Where to keep tokens given their scores.

    `seen` is the number of tokens the budget is about (the logical length: with chunked prefill, more
    than the layer holds), one value per batch row.
    """

    def n_keep(self, seen: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        """Tokens each head of this layer keeps, on average, out of `seen`."""
        raise NotImplementedError

    def head_counts(self, scores: torch.Tensor, seen: torch.Tensor, layer_idx: int, n_layers: int) -> torch.Tensor:
        """Tokens each (batch row, head) keeps: [batch, kv_heads]. By default the same in every head."""
        per_row = torch.tensor([self.n_keep(int(n), layer_idx, n_layers) for n in seen], device=scores.device)
        return per_row[:, None].expand(scores.shape[:2])

    def select(self, scores: torch.Tensor, seen: torch.Tensor, layer_idx: int = 0, n_layers: int = 1) -> torch.Tensor:
        """Keep-mask for `scores` [batch, kv_heads, stored] (padding scored -inf is never chosen first)."""
        counts = self.head_counts(scores, seen, layer_idx, n_layers).clamp(max=scores.shape[-1])
        return top_k_per_head(scores, counts)

    def describe(self) -> dict:
        """The budget's settings, as a method's constructor takes them."""
        raise NotImplementedError


class Uniform(Budget):
    """Every head of every layer keeps the same number of tokens: a fraction removed, or a token count."""

    def __init__(self, ratio: float | None = None, tokens: int | None = None):
        if (ratio is None) == (tokens is None):
            raise ValueError("give either ratio= (fraction removed) or budget= (tokens kept), not both")
        self.ratio = None if ratio is None else check_ratio(ratio)
        self.tokens = None if tokens is None else check_tokens(tokens)

    def n_keep(self, seen, layer_idx=0, n_layers=1):
        if self.tokens is not None:
            return min(self.tokens, seen)
        # floor(n (1 - ratio)) as kvpress keeps, with a tolerance so that 50 * (1 - 0.8) keeps 10, not 9
        return seen if self.ratio == 0 else math.floor(seen * (1 - self.ratio) + 1e-6)

    def describe(self) -> dict:
        return {"ratio": self.ratio} if self.tokens is None else {"budget": self.tokens}


def top_k_per_head(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep the `counts[b, h]` highest scores of each (batch row, head): a mask with per-head lengths."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                             .expand_as(order).contiguous())
    return ranks < counts[..., None].to(ranks.device)


def largest_remainder(shares: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Integers summing to `total` (per row) closest to the real `shares` [rows, heads]."""
    counts = shares.floor().long()
    missing = (total - counts.sum(-1)).clamp(min=0)
    order = (shares - counts).argsort(dim=-1, descending=True, stable=True)
    bonus = (torch.arange(shares.shape[-1], device=shares.device)[None, :] < missing[:, None]).long()
    return counts.scatter_add(-1, order, bonus)


