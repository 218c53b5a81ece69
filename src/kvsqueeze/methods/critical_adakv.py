from .adakv import HeadAdaptive
from .criticalkv import CriticalKV


class CriticalAdaKV(CriticalKV):
    """Keeps CriticalKV's two-stage choice with AdaKV's head-adaptive budgets (each head at least a safeguard share).

    Feng et al., arXiv:2502.03805 (CriticalKV) combined with arXiv:2407.11550 (AdaKV): the per-head
    budgets come from the base scores across the layer's heads, then each head selects its tokens in
    CriticalKV's two stages. Inherent cost: CriticalKV's (one more output projection of the context's values).
    """

    name = "critical_adakv"

    alpha_safeguard: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        self.allocation = HeadAdaptive(self.allocation, self.alpha_safeguard)
