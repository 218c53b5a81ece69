import torch

from ..context import LayerContext
from .base import ScorerMethod


def lag_scores(keys: torch.Tensor, values: torch.Tensor, n_sink: int, lag_size: int) -> torch.Tensor:
    """LagKV's scores of one sequence of keys/values [..., n, dim]: [..., n], higher = keep.

    After the sinks, the tokens are cut into partitions of `lag_size`; each partition is normalized by the
    per-channel min and max of the next one (its lag reference) and a token scores the spread (std over
    channels) of its normalized key and value, softmaxed within the partition and turned into its rank
    there, so that every partition gives up the same share. Sinks and the last partitions (which have no
    reference) score 1, above every rank.
    """
    n = keys.shape[-2]
    scores = torch.ones(keys.shape[:-1], device=keys.device)
    if n < n_sink + 2 * lag_size:  # too short to partition: keep sinks and the most recent tokens
        scores[..., n_sink:] = torch.arange(n - n_sink, device=keys.device) / max(n - n_sink, 1)
        return scores
    end = n_sink + (n - n_sink) // lag_size * lag_size

    def spread(states):
        parts = states[..., n_sink:end, :].float().unflatten(-2, (-1, lag_size))  # [..., partitions, lag, dim]
        target, reference = parts[..., :-1, :, :], parts[..., 1:, :, :]
        low, high = reference.amin(-2, keepdim=True), reference.amax(-2, keepdim=True)
        normalized = (target - low) / (high - low).clamp(min=torch.finfo(torch.float32).tiny)
        return normalized.std(-1).softmax(-1)  # [..., partitions - 1, lag]

    partition_scores = (spread(keys) + spread(values)) / 2
    ranks = partition_scores.argsort(dim=-1, stable=True).argsort(dim=-1) / lag_size  # in [0, 1)
    scores[..., n_sink:end - lag_size] = ranks.flatten(-2)
    return scores


class LagKV(ScorerMethod):
    """Keeps sinks, the last partition, and in every earlier partition the tokens that stand out from the next one.

    Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are Important",
    arXiv:2504.04704. Query-free and attention-free: each partition of `lag_size` tokens is scored
    against the min/max of the following partition (its "lag" reference) by the spread of its
    normalized keys and values, and the same fraction is evicted from every partition. Defaults are the
    authors' (4 sinks, partitions of 128 tokens); contexts shorter than sinks + 2 partitions keep the
    most recent tokens.
    """

    name = "lagkv"

    n_sink: int = 4
    lag_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0 or self.lag_size < 1:
            raise ValueError(f"LagKV needs n_sink >= 0 and lag_size >= 1; got {self.n_sink}, {self.lag_size}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        keys, values, real = ctx.keys, ctx.values, ctx.real
        if real is None:
            return lag_scores(keys, values, self.n_sink, self.lag_size)
        scores = torch.full(real.shape, float("-inf"), device=keys.device)
        for b, h in real.any(-1).nonzero().tolist():  # padding apart, each (row, head) is its own sequence
            index = real[b, h].nonzero()[:, 0]
            scores[b, h, index] = lag_scores(keys[b, h, index], values[b, h, index], self.n_sink, self.lag_size)
        return scores
