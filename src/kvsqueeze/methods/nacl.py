import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import ScorerMethod
from .snapkv import snapkv_scores


class NACL(ScorerMethod):
    """Keeps the proxy tokens (the end of the context), the tokens they attend to most, and a weighted random sample.

    Chen et al., "NaCl: A General and Effective KV Cache Eviction Framework for LLMs at Inference Time",
    ACL 2024, arXiv:2408.03675. One eviction after the whole context is encoded (not chunk by chunk).
    Proxy-tokens eviction scores each token by the attention the proxy tokens pay it (summed over them,
    without pooling) and keeps the proxies themselves; random eviction then fills `random_ratio` of each
    head's budget by sampling, without replacement and independently in every head and layer, tokens the
    proxy scores did not keep, with probability proportional to those scores (seeded). The paper's proxy
    tokens are the question; in kvsqueeze's query-agnostic protocol they are the last `proxy_size` tokens
    of the context (32, as SnapKV's window). By default a quarter of the budget is sampled (`random_ratio`
    0.25, a setting of ours: the paper splits the budget between the two policies and studies the split).
    """

    name = "nacl"
    declares = frozenset({"whole_context"})

    proxy_size: int = 32
    random_ratio: float = 0.25
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.proxy_size < 1 or not 0 <= self.random_ratio <= 1:
            raise ValueError(f"NACL needs proxy_size >= 1 and random_ratio in [0, 1]; got {self.proxy_size}, "
                             f"{self.random_ratio}")

    def draws(self, ctx: LayerContext, shape) -> torch.Tensor:
        """Uniform draws for the real tokens of each row, seeded by the layer: a row of a batch gets what it gets alone."""
        uniform = torch.ones(shape)
        for row in range(shape[0]):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
            if ctx.real is None:
                uniform[row] = torch.rand(shape[1:], generator=generator)
            else:
                real = ctx.real[row].cpu()
                uniform[row][real] = torch.rand(int(real.sum()), generator=generator)
        return uniform

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return snapkv_scores(ctx, self.proxy_size, kernel_size=1, pooling="max")  # kernel 1: no pooling

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        scores = self.scores(ctx)
        counts = self.allocation.head_counts(scores, ctx.row_lengths, *ctx.depth).clamp(max=scores.shape[-1])
        n_random = (counts * self.random_ratio).long()
        keep = top_k_per_head(scores, counts - n_random)
        # weighted sampling without replacement (Efraimidis & Spirakis): the largest u ** (1 / w) win
        weights = scores.masked_fill(~torch.isfinite(scores), 0.0).clamp(min=0)
        uniform = self.draws(ctx, scores.shape).to(scores.device).clamp(min=1e-12)
        keys = torch.where(weights > 0, uniform.log() / weights, torch.finfo(torch.float32).min / 2)
        keys = keys.masked_fill(keep | (scores == float("-inf")), float("-inf"))
        return keep | top_k_per_head(keys, n_random)
