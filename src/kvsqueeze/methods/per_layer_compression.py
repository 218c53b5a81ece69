from ..budgets import PerLayer
from .base import ScorerWrapper


class PerLayerCompression(ScorerWrapper):
    """Keeps a scorer's best tokens with a ratio of its own in every layer (`ratios`, one per compressible layer).

    A structural wrapper (kvpress's PerLayerCompressionPress), for schedules found offline or by hand,
    e.g. lighter compression of the first layers. Layers then hold different numbers of tokens, each
    attended with its own mask; the memory of every layer is really freed.
    """

    name = "per_layer_compression"

    def __init__(self, ratios: list[float], scorer="knorm"):
        super().__init__(scorer=scorer)
        self.budget = PerLayer(ratios)
