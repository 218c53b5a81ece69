import math
from pathlib import Path

import torch

from ..budgets import Budget, Uniform
from ..cache import compressible_layers
from ..head_scores import load_head_scores
from ..context import LayerContext
from .base import ScorerMethod
from .snapkv import snapkv_scores


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


class HeadKV(ScorerMethod):
    """Keeps SnapKV's choice of tokens with per-head budgets: heads important for retrieval keep more.

    Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval
    and Reasoning", arXiv:2410.19258. Head importance comes from a file made offline on the same model
    by `kvsqueeze calibrate headkv` (retrieval-reasoning scores on local needle tasks); each head gets
    a base budget and a share of a pool proportional to its importance (beta = 1.01 as in
    KVCache-Factory), plus an 8-token observation window; within a head, tokens are chosen by SnapKV
    scores (max pooling, kernel 7).
    """

    name = "headkv"
    calibration = "headkv"

    head_scores: "str | Path | torch.Tensor | None" = None
    beta: float = 1.01
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self):
        super().__post_init__()
        if self.head_scores is None:
            raise ValueError("HeadKV needs head importance scores: head_scores=FILE from "
                             "`kvsqueeze calibrate headkv --out FILE`")
        self.uniform = self.allocation

    def setup(self, model):
        scores = load_head_scores(self.head_scores, model, "headkv")
        compressible = compressible_layers(model.config)
        self.allocation = HeadBudgets(self.uniform, scores[compressible].clamp(min=0) + 1e-6, self.beta, self.window_size)

    def score(self, ctx: LayerContext):
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)
