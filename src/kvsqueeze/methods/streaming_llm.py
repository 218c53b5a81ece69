import torch

from ..context import LayerContext
from .base import ScorerMethod


class StreamingLLM(ScorerMethod):
    """Keeps the first `n_sink` tokens (attention sinks) and the most recent ones.

    Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
    arXiv:2309.17453. The paper keeps 4 sink tokens.
    """

    name = "streaming_llm"

    n_sink: int = 4

    def score(self, ctx: LayerContext) -> torch.Tensor:
        rank = ctx.rank  # position among the real tokens: left padding of a batch does not count
        return rank.float().masked_fill((rank >= 0) & (rank < self.n_sink), float(ctx.n_stored))
