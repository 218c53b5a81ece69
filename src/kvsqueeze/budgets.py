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
    """Where to keep tokens given their scores."""

    def n_keep(self, n_tokens: int, layer_idx: int = 0, n_layers: int = 1) -> int:
        """Tokens each head of this layer keeps out of `n_tokens`."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The budget's settings, as a method's constructor takes them."""
        raise NotImplementedError

    def select(self, scores: torch.Tensor, layer_idx: int = 0, n_layers: int = 1) -> torch.Tensor | None:
        """Keep-mask for `scores`, or None when everything is kept."""
        n_tokens = scores.shape[-1]
        k = self.n_keep(n_tokens, layer_idx, n_layers)
        return None if k >= n_tokens else top_k_mask(scores, k)


class Uniform(Budget):
    """Every head of every layer keeps the same number of tokens: a fraction removed, or a token count."""

    def __init__(self, ratio: float | None = None, tokens: int | None = None):
        if (ratio is None) == (tokens is None):
            raise ValueError("give either ratio= (fraction removed) or budget= (tokens kept), not both")
        self.ratio = None if ratio is None else check_ratio(ratio)
        self.tokens = None if tokens is None else check_tokens(tokens)

    def n_keep(self, n_tokens, layer_idx=0, n_layers=1):
        if self.tokens is not None:
            return min(self.tokens, n_tokens)
        # floor(n (1 - ratio)) as kvpress keeps, with a tolerance so that 50 * (1 - 0.8) keeps 10, not 9
        return n_tokens if self.ratio == 0 else math.floor(n_tokens * (1 - self.ratio) + 1e-6)

    def describe(self) -> dict:
        return {"ratio": self.ratio} if self.tokens is None else {"budget": self.tokens}


class Pyramid(Budget):
    """PyramidKV's layer schedule: budgets shrink linearly from the first layer to the last.

    The average over layers equals the uniform budget `base` would give. With `window` tokens always
    kept, the last layer keeps `window + (average - window) / beta` and the first layer as much
    above the average as the last is below it (PyramidKV, arXiv:2406.02069, Eq. 5-6).
    """

    def __init__(self, base: Uniform, beta: float = 20.0, window: int = 0):
        if beta < 1:
            raise ValueError(f"beta must be >= 1; got {beta}")
        self.base, self.beta, self.window = base, beta, window

    def n_keep(self, n_tokens, layer_idx=0, n_layers=1):
        average = self.base.n_keep(n_tokens)
        if average >= n_tokens or n_layers == 1 or average <= self.window:
            return average
        smallest = self.window + (average - self.window) / self.beta
        largest = 2 * average - smallest
        if largest > n_tokens:  # a layer cannot keep more than it holds: flatten the pyramid, same average
            largest, smallest = n_tokens, 2 * average - n_tokens
        k = largest - (largest - smallest) * layer_idx / (n_layers - 1)
        return max(1, min(n_tokens, round(k)))

    def describe(self) -> dict:
        return self.base.describe() | {"beta": self.beta}
