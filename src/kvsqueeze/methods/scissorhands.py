import torch

from ..budgets import top_k_per_head
from ..context import LayerContext
from .base import Method
from .h2o import causal_chunks, queries_per_chunk


def unimportance_counts(ctx: LayerContext, counted: torch.Tensor) -> torch.Tensor:
    """How many of the `counted` new queries ([batch, new] mask) found each stored token unimportant: [batch,
    kv_heads, stored]. A token is important to a query when it gets at least the average attention, 1 / (tokens
    the query sees), attention averaged over the query heads of its KV head; tokens a query cannot see do not count.
    One more attention pass over those queries, chunk by chunk (`causal_chunks`).
    """
    window = int((counted.long().cumsum(-1) > 0).sum(-1).max())  # from the first counted query to the last
    counts = torch.zeros(ctx.keys.shape[:3], device=ctx.keys.device)
    if window == 0:
        return counts
    stored, real = ctx.n_stored, ctx.real
    if real is None:  # the tokens each query of the window sees: [batch or 1, kv_heads or 1, window]
        seen = torch.arange(stored - window + 1, stored + 1, device=counts.device)[None, None]
    else:
        seen = real.long().cumsum(-1)[..., stored - window:]
    average = 1.0 / seen.clamp(min=1)
    counted = counted[:, -window:].to(counts.device)
    queries = ctx.queries[:, :, -window:]
    chunk = min(queries_per_chunk(queries.shape[1], stored, counts.device), window)
    largest = counts.numel() * chunk  # buffers reused by every chunk (no page faults for each)
    attention_buffer = torch.empty(largest, device=counts.device)
    below_buffer = torch.empty(largest, dtype=torch.bool, device=counts.device)
    for start, weights in causal_chunks(queries, ctx.keys, real, ctx.scaling, chunk):
        size, visible = weights.shape[-2:]
        shape, numel = (*counts.shape[:2], size, visible), counts.shape[0] * counts.shape[1] * size * visible
        attention = torch.mean(weights, 2, out=attention_buffer[:numel].view(shape))
        unimportant = torch.lt(attention, average[..., start:start + size, None], out=below_buffer[:numel].view(shape))
        unimportant[..., -size:] &= torch.ones(size, size, dtype=torch.bool, device=counts.device).tril()
        if real is not None:
            unimportant &= real[:, :, None, :visible]
        unimportant &= counted[:, None, start:start + size, None]
        counts[..., :visible] += unimportant.sum(2)
    return counts


class Scissorhands(Method):
    """Keeps the tokens that were important most persistently over a history window, and the most recent ones.

    Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
    Compression at Test Time", NeurIPS 2023, arXiv:2305.17118. Each head holds at most `budget` tokens.
    Over the last `history_window` queries before a compression, every stored token counts the queries
    that found it unimportant (attention below the average 1/t over the t tokens the query saw). When a
    head holds more than the budget, the `drop_ratio` * budget tokens with the highest counts go (ties: the
    later ones), the last `recent_window` never; counts then start again. Acts at prefill (on the last
    queries of the context) and at every decoding step. Defaults: a 400-query history, 10 recent tokens,
    half the budget dropped at once (the paper drops m tokens at a time, m its choice). Inherent cost: one more
    attention pass over the history window's queries.
    """

    name = "scissorhands"
    phase = "both"
    extra_work = ("attention",)

    budget: int = 512
    history_window: int = 400
    recent_window: int = 10
    drop_ratio: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if (self.budget <= 0 or self.history_window < 1 or not 0 <= self.recent_window < self.budget
                or not 0 < self.drop_ratio <= 1):
            raise ValueError("Scissorhands needs budget > 0, history_window >= 1, 0 <= recent_window < budget and "
                             f"drop_ratio in (0, 1]; got {self.budget}, {self.history_window}, {self.recent_window}, "
                             f"{self.drop_ratio}")

    @property
    def kept_after_drop(self) -> int:
        return max(self.budget - max(1, round(self.drop_ratio * self.budget)), self.recent_window, 1)

    def compress(self, ctx: LayerContext) -> None:
        n, held = ctx.n_new, ctx.held.amax(-1).cpu()  # [batch]: tokens held after this forward
        # real tokens seen by each new query (padding sits before a row's real tokens)
        seen_by = held[:, None] - n + 1 + torch.arange(n)[None, :]
        # the history: the last `history_window` queries before the budget is exceeded
        counted = (torch.arange(n)[None, :] >= n - self.history_window) & (
            seen_by > self.budget + 1 - self.history_window)
        if ctx.new_real is not None:
            counted &= ctx.new_real.cpu()
        counts = unimportance_counts(ctx, counted)
        previous = ctx.recall("scissorhands")
        if previous is not None and previous.shape[-1] <= counts.shape[-1]:
            counts[..., : previous.shape[-1]] += previous
        over = held > self.budget  # [batch]: the rows that drop tokens now; the others keep counting
        reset = over.to(counts.device)[:, None, None]
        ctx.remember("scissorhands", counts.masked_fill(reset, 0))  # counting starts again
        if not bool(over.any()):
            return
        scores = (-counts).masked_fill(ctx.rank >= ctx.held[..., None] - self.recent_window, float("inf"))
        if ctx.real is not None:
            scores = scores.masked_fill(~ctx.real, float("-inf"))
        ctx.keep(top_k_per_head(scores, ctx.held.clamp(max=self.kept_after_drop)), rows=over)
