import torch

from ..hooks import LayerContext
from .base import ScorerMethod


class StreamingLLM(ScorerMethod):
    """Keeps the first `n_sink` tokens (attention sinks) and the most recent ones.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
    arXiv:2309.17453. The paper keeps 4 sink tokens.
    """

    name = "streaming_llm"

    def __init__(self, ratio=None, budget=None, n_sink: int = 4):
        super().__init__(ratio, budget)
        self.n_sink = n_sink

    def score(self, ctx: LayerContext) -> torch.Tensor:
        rank = ctx.rank  # position among the real tokens: left padding of a batch does not count
        return rank.float().masked_fill((rank >= 0) & (rank < self.n_sink), float(ctx.n_stored))

    def settings(self):
        return {"n_sink": self.n_sink}
