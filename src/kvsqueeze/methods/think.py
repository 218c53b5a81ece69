
from ..context import LayerContext
from .base import Method, ScorerMethod, as_scorer


class ThinK(Method):
    """Keeps every token but only the key channels the recent queries use most, per head (thinner keys).

    Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", arXiv:2407.21018. Channel j of a
    head scores mean_q(q_j^2) * mean_k(k_j^2) over the last `window_size` queries (post-RoPE, averaged
    over the query heads of a KV head) and the stored keys; the lowest `key_channel_ratio` of the
    channels are dropped from the cache for real, and attention reads the matching query channels.
    The paper's default is 0.4 with a 32-token window. Give `scorer=` (a token method such as SnapKV)
    to evict tokens first, as the paper combines ThinK with SnapKV.
    """

    name = "think"
    declares = frozenset({"whole_context"})  # the kept channels are chosen once: later chunks could not change them

    key_channel_ratio: float = 0.4
    window_size: int = 32
    scorer: "str | ScorerMethod | None" = None

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.key_channel_ratio < 1:
            raise ValueError(f"key_channel_ratio must be in [0, 1); got {self.key_channel_ratio}")
        self.scorer = None if self.scorer is None else as_scorer(self.scorer)

    def compress(self, ctx: LayerContext) -> None:
        if self.scorer is not None:
            self.scorer.compress(ctx)
        pruned = int(ctx.head_dim * self.key_channel_ratio)
        if pruned == 0:
            return
        window = min(self.window_size, ctx.n_new)
        queries = ctx.per_kv_head(ctx.queries[:, :, -window:].float().pow(2).mean(2))  # [b, kv_heads, d]
        keys, real = ctx.keys.float().pow(2), ctx.real
        if real is not None:
            keys = keys * real[..., None]
        count = keys.shape[2] if real is None else real.sum(-1, keepdim=True).clamp(min=1)
        scores = queries * (keys.sum(2) / count)
        channels = scores.topk(ctx.head_dim - pruned, dim=-1).indices.sort(-1).values
        ctx.prune_key_channels(channels)
