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


class PerLayer(Budget):
    """A ratio per compressible layer, in layer order: layer i removes `ratios[i]` of its tokens."""

    def __init__(self, ratios: list[float]):
        self.ratios = [check_ratio(r) for r in ratios]
        if not self.ratios:
            raise ValueError("give one ratio per compressible layer")

    def n_keep(self, seen, layer_idx=0, n_layers=1):
        if n_layers != len(self.ratios):
            raise ValueError(f"{len(self.ratios)} ratios for a model with {n_layers} compressible layers")
        return Uniform(ratio=self.ratios[layer_idx]).n_keep(seen)

    def describe(self) -> dict:
        return {"ratios": self.ratios}


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


class HeadBudgets(Budget):
    """HeadKV's allocation: every head gets a base share; a pool is split by head importance.

    With a per-head budget k of which `window` tokens are the always-kept window, B = k - window;
    each head gets B - floor(B/beta) plus importance[l, h] * floor(B/beta) * (heads in all layers),
    importance normalised to sum to 1 (Fu et al., arXiv:2410.19258). Averaged over heads it is k.
    """

    def __init__(self, base: Uniform, importance: torch.Tensor, beta: float = 1.01, window: int = 0):
        if beta < 1:
            raise ValueError(f"beta must be >= 1; got {beta}")
        self.base, self.beta, self.window = base, beta, window
        self.importance = importance / importance.sum()  # [compressible layers, kv heads]

    def n_keep(self, n_tokens, layer_idx=0, n_layers=1):
        return self.base.n_keep(n_tokens)

    def layer_counts(self, n_tokens: int, layer_idx: int) -> torch.Tensor:
        """Tokens each KV head of layer `layer_idx` keeps out of `n_tokens`."""
        k = self.base.n_keep(n_tokens)
        share, room = max(k - self.window, 0), max(n_tokens - self.window, 0)
        pool = math.floor(share / self.beta)
        counts = self.importance * pool * self.importance.numel() + share - pool
        # A head cannot keep more than the context: what it cannot take goes to the others by importance
        # (the authors truncate instead, which keeps less than the budget when budgets are large).
        for _ in range(self.importance.numel()):
            full = counts >= room
            excess = (counts[full] - room).sum()
            if excess <= 1e-6 or bool(full.all()):
                break
            counts = torch.where(full, torch.tensor(float(room)), counts)
            counts[~full] += excess * self.importance[~full] / self.importance[~full].sum()
        return (counts[layer_idx].round().long() + self.window).clamp(1, n_tokens)

    def head_counts(self, scores, seen, layer_idx=0, n_layers=1):
        return torch.stack([self.layer_counts(int(n), layer_idx) for n in seen]).to(scores.device)

    def describe(self) -> dict:
        return self.base.describe() | {"beta": self.beta}
