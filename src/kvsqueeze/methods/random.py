import torch

from ..context import LayerContext
from .base import ScorerMethod


class Random(ScorerMethod):
    """Keeps a uniformly random subset of tokens in every head (the baseline every method must beat)."""

    name = "random"

    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.generator = torch.Generator().manual_seed(self.seed)

    def setup(self, model):
        self.generator.manual_seed(self.seed)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        shape = ctx.keys.shape[:-1]
        return torch.rand(shape, generator=self.generator).to(ctx.keys.device)
