import math

import torch

from ..context import LayerContext
from .base import ScorerMethod


def z_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores [batch, heads, n] standardised over the heads and tokens of each batch row."""
    flat = scores.flatten(1)
    return ((flat - flat.mean(-1, keepdim=True)) / flat.std(-1, keepdim=True).clamp(min=1e-6)).view_as(scores)


def leverage_scores(keys: torch.Tensor, sketch_dimension: int, seed: int = 0) -> torch.Tensor:
    """Approximate statistical leverage of each key among its head's keys [batch, heads, n, dim]: [batch, heads, n].

    The centred keys are sketched on the right by a Gaussian matrix (the same for every batch row), and the
    leverage diag(X (X^T X)^-1 X^T) of the sketch X is the squared norm of each row of X L^-T, with L L^T = X^T X
    (Cholesky): one small triangular inverse and one product instead of a solve against every key.
    """
    batch, heads, n, dim = keys.shape
    generator = torch.Generator().manual_seed(seed)
    sketch = (torch.randn(heads, dim, sketch_dimension, generator=generator) / math.sqrt(sketch_dimension)).to(keys.device)
    x = (keys.float() - keys.float().mean(-2, keepdim=True)) @ sketch
    gram = x.transpose(-1, -2) @ x
    gram = (gram + gram.transpose(-1, -2)) / 2
    identity = torch.eye(sketch_dimension, device=keys.device)
    for jitter in (1e-2, 1e-1, 1.0, 10.0, 100.0):  # a rank-deficient sketch (few tokens) needs a larger ridge
        factor, info = torch.linalg.cholesky_ex(gram + jitter * identity)
        if not bool(info.any()):
            break
    else:
        raise RuntimeError("the keys' Gram matrix could not be factorised")
    whitening = torch.linalg.solve_triangular(factor, identity, upper=False)  # L^-1
    return (x @ whitening.transpose(-1, -2)).square_().sum(-1)


def by_row(ctx: LayerContext, score_real) -> torch.Tensor:
    """Scores of a freshly prefilled layer, each batch row over its real tokens (a suffix after left padding).

    `score_real(rows, start)` scores the tokens from `start` on of the batch rows `rows` (a slice)."""
    if ctx.real is None:
        return score_real(slice(None), 0)
    scores = torch.full(ctx.real.shape, float("-inf"), device=ctx.keys.device)
    for b, n_real in enumerate(ctx.real[:, 0].sum(-1).tolist()):
        if n_real:
            start = ctx.n_stored - n_real
            scores[b:b + 1, :, start:] = score_real(slice(b, b + 1), start)
    return scores


class LeverageScore(ScorerMethod):
    """Keeps the keys that stand out geometrically: the highest approximate statistical leverage, per head.

    Chari & Van Durme, "Compactor: Calibrated Query-Agnostic KV Cache Compression with Approximate
    Leverage Scores", arXiv:2507.08143. Leverage is computed on the centred pre-RoPE keys through a
    right Gaussian sketch of `sketch_dimension` (48, the authors' setting; seeded) and a Cholesky solve, as
    in the authors' kvpress implementation, then z-scored per batch row. Prefill only: it scores the whole
    context at once.
    """

    name = "leverage_score"
    declares = frozenset({"whole_context"})

    sketch_dimension: int = 48
    seed: int = 0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        keys = ctx.rope.keys
        return by_row(ctx, lambda rows, start: z_scores(
            leverage_scores(keys[rows, :, start:], self.sketch_dimension, self.seed)))
