from ..budgets import HeadAdaptive
from .criticalkv import CriticalKV


class CriticalAdaKV(CriticalKV):
    """Keeps CriticalKV's two-stage choice with AdaKV's head-adaptive budgets (each head at least a safeguard share).

    Feng et al., arXiv:2502.03805 (CriticalKV) combined with arXiv:2407.11550 (AdaKV): the per-head
    budgets come from the base scores across the layer's heads, then each head selects its tokens in
    CriticalKV's two stages.
    """

    name = "critical_adakv"

    def __init__(self, ratio=None, budget=None, scorer="snapkv", first_stage_ratio: float = 0.5,
                 epsilon: float = 1e-4, alpha_safeguard: float = 0.2):
        super().__init__(ratio, budget, scorer, first_stage_ratio, epsilon)
        self.budget = HeadAdaptive(self.budget, alpha_safeguard)
