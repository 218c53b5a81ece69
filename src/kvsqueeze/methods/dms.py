import torch

from ..context import LayerContext
from .base import Method, ScorerMethod, as_scorer


class DMS(Method):
    """Keeps, per head, the tokens whose score reaches `threshold`, and always the last `window_size` tokens.

    Threshold eviction with delayed decisions, after Dynamic Memory Sparsification (Łańcucki et al.,
    "Inference-Time Hyper-Scaling with KV Cache Compression", arXiv:2506.05345): a token is judged once
    it leaves the sliding window of recent tokens, and evicted if its score (any scorer's; KNorm by
    default, whose scores are minus key norms) is below the threshold. Heads keep different numbers of
    tokens (ragged, memory really freed). With `decoding=True` it also acts at every generation step,
    so the cache stays bounded by what passes the threshold plus the window. kvpress's window (128).
    """

    name = "dms"

    threshold: float
    scorer: "str | ScorerMethod" = "knorm"
    window_size: int = 128
    decoding: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.threshold = float(self.threshold)
        self.scorer = as_scorer(self.scorer)
        self.phase = "both" if self.decoding else "prefill"

    def compress(self, ctx: LayerContext) -> None:
        real = ctx.real if ctx.real is not None else torch.ones(ctx.keys.shape[:-1], dtype=torch.bool,
                                                               device=ctx.keys.device)
        from_end = real.flip(-1).cumsum(-1).flip(-1)  # 1 for each head's newest token
        keep = (self.scorer.score(ctx) >= self.threshold) | (from_end <= self.window_size)
        if bool((keep | ~real).all()):
            return  # nothing leaves: no copy
        ctx.keep(keep & real)
