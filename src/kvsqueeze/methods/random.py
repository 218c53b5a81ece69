import torch

from ..hooks import LayerContext
from .base import ScorerMethod


class Random(ScorerMethod):
    """Keeps a uniformly random subset of tokens in every head (the baseline every method must beat)."""

    name = "random"

    def __init__(self, ratio=None, budget=None, seed: int = 0):
        super().__init__(ratio, budget)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def setup(self, model):
        self.generator.manual_seed(self.seed)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        shape = ctx.keys.shape[:-1]
        return torch.rand(shape, generator=self.generator).to(ctx.keys.device)

    def settings(self):
        return {"seed": self.seed}
