import torch
import torch.nn.functional as F

from ..context import LayerContext
from .base import ScorerMethod
from .expected_attention import context_queries, future_rotation, sinks


def capacity_scores(anchor: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, counted: torch.Tensor,
                    tau: float, epsilon: float) -> torch.Tensor:
    """CapKV's score w_i * v_i' A^-1 v_i of every token, A = I + sum_j w_j v_j v_j' over the `counted` tokens.

    anchor [batch, heads, dim]; keys, values [batch, kv_heads, n, dim], each KV head shared by a group of query
    heads (never repeated per head); counted [batch, kv_heads, n] (bool). Returns [batch, heads, n].
    w_i = exp(tau * cos(anchor, k_i)), shifted by its maximum over the counted tokens of a head.
    """
    batch, heads, dim = anchor.shape
    kv_heads = keys.shape[1]
    anchor = F.normalize(anchor, dim=-1).view(batch, kv_heads, heads // kv_heads, dim)
    alignment = (anchor @ F.normalize(keys, dim=-1).transpose(-1, -2)).clamp(-1, 1)  # [batch, kv_heads, group, n]
    counted = counted[:, :, None]
    logits = (tau * alignment).masked_fill(~counted, float("-inf"))
    weights = (logits - logits.amax(-1, keepdim=True).clamp(min=-tau)).exp()  # 0 where not counted
    shared = values[:, :, None]  # [batch, kv_heads, 1, n, dim]
    scaled = shared * (weights + epsilon * counted).sqrt()[..., None]
    capacity = torch.eye(dim, device=values.device) + scaled.transpose(-1, -2) @ scaled
    inverse = torch.linalg.inv(capacity)  # [batch, kv_heads, group, dim, dim]: cheaper than solving for every token
    leverage, products = torch.empty_like(weights), torch.empty_like(values)
    for h in range(inverse.shape[2]):  # v' A^-1 v, one query head of each group at a time, in one buffer
        leverage[:, :, h] = torch.matmul(values, inverse[:, :, h], out=products).mul_(values).sum(-1)
    return (weights * leverage).view(batch, heads, -1)


class Cap(ScorerMethod):
    """Keeps the tokens that add most information capacity: relevance to past queries times value leverage.

    "Rethinking KV Cache Eviction via a Unified Information-Theoretic Objective" (CapKV), arXiv:2604.25975.
    Under a linear-Gaussian view of attention the retained cache's information is log det(I + sum w_i
    v_i v_i'); a token scores w_i * v_i' A^-1 v_i (its weighted leverage in A = I + sum w_j v_j v_j'), with
    w_i = exp(tau * <k_i, mu_q>) and mu_q the mean of the context's queries (before RoPE, the `n_sink`
    first left out) rotated by the mean RoPE rotation of the next `n_future_positions` positions. As in
    NVIDIA kvpress's CapPress, keys and anchor are L2-normalised and the weights max-shifted per head;
    scores are averaged over the query heads of a KV head and the sinks are always kept. Defaults are
    kvpress's (tau 5, 512 future positions, 4 sinks, epsilon 1e-6).
    """

    name = "cap"

    tau: float = 5.0
    n_future_positions: int = 512
    n_sink: int = 4
    epsilon: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.n_sink < 0 or self.n_future_positions < 1:
            raise ValueError(f"Cap needs n_sink >= 0 and n_future_positions >= 1; got {self.n_sink}, "
                             f"{self.n_future_positions}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        n_sink, sink = sinks(ctx, self.n_sink)
        counted = ctx.rank >= n_sink  # real tokens past the sinks
        mean, _ = context_queries(ctx, n_sink)
        anchor = torch.einsum("bhd,bed->bhe", mean, future_rotation(ctx, self.n_future_positions))

        scores = capacity_scores(anchor, ctx.keys.float(), ctx.values.float(), counted, self.tau, self.epsilon)
        return ctx.per_kv_head(scores).masked_fill(sink, float("inf"))
