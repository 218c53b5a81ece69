from pathlib import Path

import torch

from ..context import LayerContext
from .base import ScorerMethod


def mean_rotation(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The RoPE rotation matrix averaged over positions: mean of diag(cos) + diag(sin) @ P, with P q = rotate_half(q)."""
    rotary = cos.shape[-1]
    half = rotary // 2
    swap = torch.zeros(rotary, rotary, dtype=cos.dtype, device=cos.device)
    swap[:half, half:] = -torch.eye(half)
    swap[half:, :half] = torch.eye(half)
    rotation = torch.diag_embed(cos.mean(0)) + sin.mean(0)[:, None] * swap
    full = torch.eye(head_dim, dtype=cos.dtype, device=cos.device)
    full[:rotary, :rotary] = rotation  # dimensions beyond the rotary ones are not rotated
    return full


def sinks(ctx: LayerContext, n_sink: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sinks per batch row [batch, 1, 1], at most `n_sink` and leaving each head a token to choose; the sink mask
    [batch, kv_heads, stored]): the first real tokens, always kept and left out of the query statistics."""
    n = (ctx.held.amin(-1) - 1).clamp(min=0, max=n_sink)[:, None, None]
    rank = ctx.rank
    return n, (rank >= 0) & (rank < n)


def context_queries(ctx: LayerContext, n_sink: torch.Tensor, covariance: bool = False, chunk: int = 256
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean [batch, heads, d], with `covariance` their covariance [batch, heads, d, d], else None) of this
    forward's pre-RoPE queries, the real ones past the sinks. Summed `chunk` queries at a time: each chunk is
    un-rotated into a small buffer that stays in cache, never a fresh copy of all the queries."""
    counted = (ctx.rank[:, 0, -ctx.n_new:] >= n_sink[:, 0]).float()  # [batch, new]
    if ctx.new_real is not None:
        counted = counted * ctx.new_real.float()
    batch, heads, new, dim = ctx.queries.shape
    total = torch.zeros(batch, heads, dim, device=ctx.queries.device)
    second_moment = torch.zeros(batch, heads, dim, dim, device=ctx.queries.device) if covariance else None
    for start in range(0, new, chunk):
        tokens = slice(start, start + chunk)
        queries = ctx.rope.unrotate(ctx.queries[:, :, tokens].float(), tokens).mul_(counted[:, None, tokens, None])
        total += queries.sum(2)
        if covariance:  # the queries not counted are zero: q'q sums over the counted ones
            second_moment += queries.transpose(-1, -2) @ queries
    count = counted.sum(-1).clamp(min=1)[:, None, None]
    mean = total / count
    if not covariance:
        return mean, None
    return mean, second_moment / count[..., None] - mean[..., :, None] * mean[..., None, :]


def future_rotation(ctx: LayerContext, n_future_positions: int) -> torch.Tensor:
    """[batch, d, d]: the mean RoPE rotation of the next `n_future_positions` positions of each row (after its length)."""
    return torch.stack([
        mean_rotation(*(t[0].float() for t in ctx.rope.at(torch.arange(seen, seen + n_future_positions))),
                      ctx.head_dim) for seen in ctx.row_lengths.tolist()])


class ExpectedAttention(ScorerMethod):
    """Keeps the tokens that future queries are expected to attend to most, weighted by their value norm.

    Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention from Future
    Queries Distribution", arXiv:2510.00636. The queries of the context (after their norm, before
    RoPE; the first `n_sink` left out) give a Gaussian; it is rotated by the mean RoPE rotation of the
    next `n_future_positions` positions, and the expected attention of each key under it,
    softmax(s·mu·k + s²/2·k'Σk), is averaged over the query heads of a KV head and multiplied by
    the value norm. The sinks are always kept. Defaults are the paper's.

    `stats=FILE` uses query statistics collected offline on the same model instead of the context's own
    queries (the paper's "with stats" variant, kvpress ExpectedAttentionStatsPress): per layer and query
    head, the mean and covariance of the pre-RoPE queries over local text, made by
    `kvsqueeze calibrate expected_attention --out FILE`. The context's queries are then not needed.
    """

    name = "expected_attention"
    calibration = "expected_attention"
    calibration_required = False

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    stats: "str | Path | None" = None

    def __post_init__(self):
        super().__post_init__()
        self.loaded = None

    def setup(self, model):
        if self.stats is not None:
            from ..calibration import load_calibration  # calibration runs methods: imported when used

            loaded = load_calibration(self.stats, "expected_attention", model)
            self.loaded = {name: t.to(model.device) for name, t in loaded.items()}

    def query_statistics(self, ctx: LayerContext, n_sink: torch.Tensor):
        """Mean [batch, heads, d] and covariance [batch, heads, d, d] (None without use_covariance) of the
        pre-RoPE queries: the saved statistics, or those of this forward's real queries, the sinks left out."""
        batch = ctx.keys.shape[0]
        if self.loaded is not None:
            device = ctx.keys.device
            mean = self.loaded["mean"][ctx.layer_idx].to(device).expand(batch, -1, -1)
            if not self.use_covariance:
                return mean, None
            return mean, self.loaded["covariance"][ctx.layer_idx].to(device).expand(batch, -1, -1, -1)
        return context_queries(ctx, n_sink, self.use_covariance)

    @staticmethod
    def expected_logits(keys: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor | None, scaling: float
                        ) -> torch.Tensor:
        """s·mu·k + s²/2·k'Σk for every query head's mean [batch, heads, d] (and covariance [batch, heads, d, d]) and
        every key [batch, kv_heads, n, d] of its KV head: [batch, heads, n]. One query head of each group at a time
        against the shared keys (never repeated per query head; the products stay in cache)."""
        batch, kv_heads, n, dim = keys.shape
        group = mean.shape[1] // kv_heads
        mean = mean.view(batch, kv_heads, group, 1, dim)
        logits = torch.empty(batch, kv_heads, group, n, device=keys.device)
        spread = torch.empty_like(keys)
        for h in range(group):
            logits[:, :, h] = (mean[:, :, h] @ keys.transpose(-1, -2))[:, :, 0] * scaling
            if covariance is not None:  # k'Σk, the products in one buffer for the whole group
                spread = torch.matmul(keys, covariance.view(batch, kv_heads, group, dim, dim)[:, :, h], out=spread)
                logits[:, :, h] += 0.5 * scaling ** 2 * spread.mul_(keys).sum(-1)
        return logits.view(batch, kv_heads * group, n)

    def score(self, ctx: LayerContext) -> torch.Tensor:
        n_sink, sink = sinks(ctx, self.n_sink)
        mean, covariance = self.query_statistics(ctx, n_sink)
        rotation = future_rotation(ctx, self.n_future_positions)

        logits = self.expected_logits(ctx.keys.float(), torch.einsum("bhd,bed->bhe", mean, rotation),
                                      None if covariance is None else
                                      rotation[:, None] @ covariance @ rotation.transpose(-1, -2)[:, None], ctx.scaling)
        hidden = sink if ctx.real is None else sink | ~ctx.real  # the softmax is over the other tokens
        logits = logits.masked_fill(hidden.repeat_interleave(ctx.group_size, dim=1), float("-inf"))
        scores = ctx.per_kv_head(logits.softmax(dim=-1))
        if self.use_vnorm:
            scores = (scores + self.epsilon) * ctx.values.float().norm(dim=-1)
        return scores.masked_fill(sink, float("inf"))
