import torch

from ..hooks import LayerContext
from .base import Method, as_scorer


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
    needs_whole_context = True  # the kept channels are chosen once: later chunks could not change them

    def __init__(self, key_channel_ratio: float = 0.4, window_size: int = 32, scorer=None):
        if not 0 <= key_channel_ratio < 1:
            raise ValueError(f"key_channel_ratio must be in [0, 1); got {key_channel_ratio}")
        self.key_channel_ratio, self.window_size = key_channel_ratio, window_size
        self.scorer = None if scorer is None else as_scorer(scorer)

    def setup(self, model):
        if self.scorer is not None:
            self.scorer.setup(model)

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

    def describe(self):
        settings = {"key_channel_ratio": self.key_channel_ratio, "window_size": self.window_size}
        return settings | ({"scorer": repr(self.scorer)} if self.scorer is not None else {})
