import math

import torch

from ..context import LayerContext
from .base import ScorerMethod

LEVERAGE_TYPES = {  # how key and value leverage make a token's score
    "key": lambda key, value: key,
    "value": lambda key, value: value,
    "kv_avg": lambda key, value: (key + value) / 2,
    "kv_product": lambda key, value: key * value,
}


def row_energy(states: torch.Tensor, sketch: torch.Tensor | None) -> torch.Tensor:
    """Squared norm of each row of `states` [..., n, dim] (after the Gaussian `sketch` [dim, r] if given): [..., n]."""
    states = states.float()
    if sketch is not None:
        states = states @ sketch
    return states.pow(2).sum(-1)


def local_share(energy: torch.Tensor, rank: torch.Tensor, window: int) -> torch.Tensor:
    """Each token's share of the energy of its window of `window` consecutive real tokens (by `rank`, padding -1)."""
    group = rank.clamp(min=0) // window
    energy = energy * (rank >= 0)
    totals = torch.zeros_like(energy).scatter_add_(-1, group, energy)
    return energy / totals.gather(-1, group).clamp(min=torch.finfo(energy.dtype).tiny)


class CUR(ScorerMethod):
    """Keeps sinks and the tokens whose keys and values have the highest approximate CUR leverage scores.

    Sengupta, Chaudhary & Chakraborty, "Value-Guided KV Compression for LLMs via Approximated CUR
    Decomposition" (CurDKV), arXiv:2509.15038. A token's leverage is approximated, as in the authors'
    implementation (kvpress CURPress), by the squared norm of its key and of its value (optionally after a
    seeded Gaussian projection to `sketch_dimension` dimensions, the authors' r = 20), taken as a share of
    its window of `local_window_size` (16) consecutive tokens (None: not normalised); `leverage_type`
    combines them (default the product of key and value leverage). The first `n_sink` (4) tokens are always
    kept. Defaults are kvpress's (no projection, local windows of 16). Query-free.
    """

    name = "cur"

    n_sink: int = 4
    leverage_type: str = "kv_product"
    local_window_size: int | None = 16
    sketch_dimension: int | None = None
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.leverage_type not in LEVERAGE_TYPES:
            raise ValueError(f"leverage_type must be one of {', '.join(LEVERAGE_TYPES)}; got {self.leverage_type!r}")
        if self.local_window_size is not None and self.local_window_size < 1:
            raise ValueError(f"local_window_size must be >= 1 (or None); got {self.local_window_size}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        sketch = None
        if self.sketch_dimension:  # one projection shared by keys and values, as the authors do
            r = self.sketch_dimension
            sketch = torch.randn(ctx.head_dim, r, generator=torch.Generator().manual_seed(self.seed)) / math.sqrt(r)
            sketch = sketch.to(ctx.keys.device)
        rank = ctx.rank
        key, value = row_energy(ctx.keys, sketch), row_energy(ctx.values, sketch)
        if self.local_window_size:
            key, value = (local_share(e, rank, self.local_window_size) for e in (key, value))
        scores = LEVERAGE_TYPES[self.leverage_type](key, value)
        return scores.masked_fill((rank >= 0) & (rank < self.n_sink), float("inf"))
