from ..budgets import HeadBudgets
from ..cache import layer_types
from ..head_scores import load_head_scores
from ..hooks import LayerContext
from .base import ScorerMethod
from .snapkv import snapkv_scores


class HeadKV(ScorerMethod):
    """Keeps SnapKV's choice of tokens with per-head budgets: heads important for retrieval keep more.

    Fu et al., "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated Retrieval
    and Reasoning", arXiv:2410.19258. Head importance comes from a file made offline on the same model
    by `kvsqueeze calibrate headkv` (retrieval-reasoning scores on local needle tasks); each head gets
    a base budget and a share of a pool proportional to its importance (beta = 1.01 as in
    KVCache-Factory), plus an 8-token observation window; within a head, tokens are chosen by SnapKV
    scores (max pooling, kernel 7).
    """

    name = "headkv"
    calibration = "headkv"

    def __init__(self, ratio=None, budget=None, head_scores=None, beta: float = 1.01, window_size: int = 8,
                 kernel_size: int = 7, pooling: str = "max"):
        super().__init__(ratio, budget)
        if head_scores is None:
            raise ValueError("HeadKV needs head importance scores: head_scores=FILE from "
                             "`kvsqueeze calibrate headkv --out FILE`")
        self.head_scores, self.beta = head_scores, beta
        self.window_size, self.kernel_size, self.pooling = window_size, kernel_size, pooling
        self.uniform = self.budget

    def setup(self, model):
        scores = load_head_scores(self.head_scores, model, "headkv")
        compressible = [i for i, kind in enumerate(layer_types(model.config)) if kind == "full_attention"]
        self.budget = HeadBudgets(self.uniform, scores[compressible].clamp(min=0) + 1e-6, self.beta, self.window_size)

    def score(self, ctx: LayerContext):
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)

    def describe(self):
        return self.uniform.describe() | {"head_scores": str(self.head_scores)[:80], "beta": self.beta,
                                          "window_size": self.window_size}
