from ..budgets import Budget, Uniform, check_ratio
from .base import ScorerMethod, TopScores, as_scorer


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


class PerLayerCompression(TopScores):
    """Keeps a scorer's best tokens with a ratio of its own in every layer (`ratios`, one per compressible layer).

    A structural wrapper (kvpress's PerLayerCompressionPress), for schedules found offline or by hand,
    e.g. lighter compression of the first layers. Layers then hold different numbers of tokens, each
    attended with its own mask; the memory of every layer is really freed.
    """

    name = "per_layer_compression"

    ratios: list[float]
    scorer: "str | ScorerMethod" = "knorm"

    def __post_init__(self):
        super().__post_init__()
        self.allocation = PerLayer(self.ratios)
        self.scorer = as_scorer(self.scorer)

    def score(self, ctx):
        return self.scorer.score(ctx)
