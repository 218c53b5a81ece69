from ..budgets import Pyramid
from ..hooks import LayerContext
from .base import ScorerMethod
from .snapkv import snapkv_scores


class PyramidKV(ScorerMethod):
    """Keeps SnapKV's choice of tokens, with budgets shrinking linearly from the first layer to the last.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    arXiv:2406.02069. The average budget over layers equals the uniform one (`ratio` / `budget`);
    the last layer keeps the window plus 1/`beta` of its share (the paper's beta = 20). Layers then
    hold different numbers of tokens, each attended with its own mask.
    """

    name = "pyramidkv"

    def __init__(self, ratio=None, budget=None, window_size: int = 32, kernel_size: int = 7, pooling: str = "max",
                 beta: float = 20):
        super().__init__(ratio, budget)
        self.budget = Pyramid(self.budget, beta=beta, window=window_size)
        self.window_size, self.kernel_size, self.pooling = window_size, kernel_size, pooling

    def score(self, ctx: LayerContext):
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)

    def settings(self):
        return {"window_size": self.window_size, "kernel_size": self.kernel_size, "pooling": self.pooling}
