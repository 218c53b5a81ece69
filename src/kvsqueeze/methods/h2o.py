import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import Method


def queries_per_chunk(heads: int, stored: int, device: torch.device) -> int:
    """How many queries one chunk of `causal_chunks` holds: on a CPU, weights of about 2^20 floats (4 MB, which stay
    in cache: three times faster than 512-query chunks at 2,048 tokens on the bundled model); on an accelerator
    2^26 (few kernel launches)."""
    return max(8, (2**20 if device.type == "cpu" else 2**26) // (heads * stored))


def causal_chunks(query: torch.Tensor, keys: torch.Tensor, real: torch.Tensor | None, scaling: float,
                  chunk: int | None = None):
    """The causal attention probabilities of `query` [batch, heads, n, dim] (the last n stored tokens) over `keys`
    [batch, kv_heads, stored, dim], chunk by chunk: yields (start, weights [batch, kv_heads, group, size, seen]) for
    queries start..start + size, over the first `seen` stored keys (the ones they can see; the later ones get 0).
    `real` [batch, kv_heads, stored] hides padding keys (None: none); a query that sees no real key weighs 0.

    One more pass at the cost of its QKᵀ product: grouped query heads multiplied against their shared keys (nothing
    repeated, no n × n matrix), `chunk` queries at a time (None: `queries_per_chunk`). `weights` is only valid
    until the next chunk is asked for.
    """
    batch, heads, n, dim = query.shape
    kv_heads, stored = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    chunk = min(chunk or queries_per_chunk(heads, stored, keys.device), n)
    grouped = (query * scaling).view(batch, kv_heads, group, n, dim)  # scaled once, not every logit
    future = torch.ones(chunk, chunk, dtype=torch.bool, device=keys.device).triu(1)
    transposed = keys.transpose(-1, -2)
    # one buffer for the logits and one for the weights, reused by every chunk: a fresh tensor per chunk may cost
    # its page faults again (glibc maps large allocations afresh until it has seen them freed)
    largest = batch * heads * chunk * stored
    logits_buffer = torch.empty(largest, dtype=query.dtype, device=keys.device)
    weights_buffer = torch.empty(largest, device=keys.device)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        seen = stored - n + start + size  # the last key a query of this chunk sees
        shape, numel = (batch, kv_heads, group * size, seen), batch * heads * size * seen
        block = grouped[:, :, :, start:start + size].reshape(batch, kv_heads, group * size, dim)
        logits = torch.matmul(block, transposed[..., :seen], out=logits_buffer[:numel].view(shape))
        logits = logits.view(batch, kv_heads, group, size, seen)
        logits[..., -size:].masked_fill_(future[:size, :size], float("-inf"))
        if real is not None:
            logits.masked_fill_(~real[:, :, None, None, :seen], float("-inf"))
        weights = torch.softmax(logits, -1, dtype=torch.float32, out=weights_buffer[:numel].view(logits.shape))
        if real is not None:
            weights.nan_to_num_(0.0)  # a padding query sees no real key: it pays nothing
        yield start, weights


def attention_received(query: torch.Tensor, keys: torch.Tensor, real: torch.Tensor | None, scaling: float,
                       query_real: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Attention each stored key receives from `query` [batch, heads, n, dim] (the last n stored tokens, causal),
    summed over the queries and over the query heads of each KV head: [batch, kv_heads, stored]. `real` [batch,
    kv_heads, stored] hides padding keys, `query_real` [batch, n] leaves padding queries out (None: none).

    One more attention pass at the cost of its QKᵀ product, chunk by chunk (`causal_chunks`).
    """
    batch, kv_heads, stored = keys.shape[:3]
    total = torch.zeros(batch, kv_heads, stored, device=keys.device)
    for start, weights in causal_chunks(query, keys, real, scaling, chunk):
        size, seen = weights.shape[-2:]
        if query_real is not None:
            weights.mul_(query_real[:, None, None, start:start + size, None])
        total[..., :seen] += weights.sum((2, 3))
    return total


def accumulated_attention(ctx: LayerContext) -> torch.Tensor:
    """Attention each stored token received from this forward's queries, summed over them and averaged over the
    query heads of its KV head: [batch, kv_heads, stored] (one more attention pass, chunk by chunk)."""
    return attention_received(ctx.queries, ctx.keys, ctx.real, ctx.scaling, ctx.new_real) / ctx.group_size


class H2O(Method):
    """Keeps the heavy hitters (most attention accumulated over all queries so far) and the most recent tokens.

    Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
    Models", NeurIPS 2023, arXiv:2306.14048. Every forward adds the attention its queries pay to each
    stored token; when a head holds more than `budget` tokens it keeps the last `recent_ratio` of the
    budget and, of the others, the highest accumulated attention (the paper splits the budget evenly).
    Acts at prefill and at every decoding step. Inherent cost: one more attention pass (QKᵀ and softmax, chunk by
    chunk, no P·V) over each forward's queries.
    """

    name = "h2o"
    phase = "both"
    extra_work = ("attention",)

    budget: int = 512
    recent_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.budget <= 0 or not 0 <= self.recent_ratio <= 1:
            raise ValueError(f"H2O needs budget > 0 and recent_ratio in [0, 1]; got {self.budget}, {self.recent_ratio}")

    def compress(self, ctx: LayerContext) -> None:
        previous = ctx.recall("h2o")
        fresh = accumulated_attention(ctx)
        if previous is not None and previous.shape[-1] <= fresh.shape[-1]:
            fresh[..., : previous.shape[-1]] += previous
        ctx.remember("h2o", fresh)
        if int(ctx.held.max()) <= self.budget:
            return
        recent = int(self.budget * self.recent_ratio)
        scores = fresh.masked_fill(ctx.rank >= ctx.held[..., None] - recent, float("inf"))
        ctx.keep(top_k_per_head(scores, ctx.held.clamp(max=self.budget)))
