from ..budgets import PerLayer
from ..hooks import LayerContext
from .base import ScorerMethod, as_scorer


class PerLayerCompression(ScorerMethod):
    """Keeps a scorer's best tokens with a ratio of its own in every layer (`ratios`, one per compressible layer).

    A structural wrapper (kvpress's PerLayerCompressionPress), for schedules found offline or by hand,
    e.g. lighter compression of the first layers. Layers then hold different numbers of tokens, each
    attended with its own mask; the memory of every layer is really freed.
    """

    name = "per_layer_compression"

    def __init__(self, ratios: list[float], scorer="knorm"):
        self.scorer = as_scorer(scorer)
        self.budget = PerLayer(ratios)

    def setup(self, model):
        self.scorer.setup(model)

    def score(self, ctx: LayerContext):
        return self.scorer.score(ctx)

    def settings(self):
        return {"scorer": self.scorer.name}
