from ..budgets import HeadAdaptive
from .base import ScorerWrapper


class AdaKV(ScorerWrapper):
    """Keeps a layer's highest-scoring tokens across all its heads, each head keeping at least a safeguard share.

    Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient LLM
    Inference", arXiv:2407.11550. The layer's budget (`ratio` / `budget` per head, times the heads)
    goes to its globally highest scores; head h then keeps floor(alpha*k) + (1 - alpha)*c_h tokens,
    c_h being its share of the global top, as in the authors' code (alpha_safeguard = 0.2). Heads keep
    different numbers of tokens, stored ragged, so the memory is really freed. Any scorer works; the
    paper's is SnapKV (window 32, max pooling, kernel 7), the default.
    """

    name = "adakv"

    def __init__(self, ratio=None, budget=None, scorer="snapkv", alpha_safeguard: float = 0.2):
        super().__init__(ratio, budget, scorer)
        self.budget = HeadAdaptive(self.budget, alpha_safeguard)
