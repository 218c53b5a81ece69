from ..budgets import Budget, Uniform
from ..context import LayerContext
from .base import ScorerMethod
from .snapkv import snapkv_scores


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


class PyramidKV(ScorerMethod):
    """Keeps SnapKV's choice of tokens, with budgets shrinking linearly from the first layer to the last.

    Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    arXiv:2406.02069. The average budget over layers equals the uniform one (`ratio` / `budget`);
    the last layer keeps the window plus 1/`beta` of its share (the paper's beta = 20). Layers then
    hold different numbers of tokens, each attended with its own mask.
    """

    name = "pyramidkv"

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    beta: float = 20

    def __post_init__(self):
        super().__post_init__()
        self.allocation = Pyramid(self.allocation, beta=self.beta, window=self.window_size)

    def score(self, ctx: LayerContext):
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)
