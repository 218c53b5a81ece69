import torch

from ..budgets import top_k_per_head
from ..context import LayerContext, last_queries_attention
from .base import Method


def unimportance_counts(ctx: LayerContext, counted: torch.Tensor) -> torch.Tensor:
    """How many of the `counted` new queries ([batch, new] mask) found each stored token unimportant: [batch,
    kv_heads, stored]. A token is important to a query when it gets at least the average attention, 1 / (tokens
    the query sees), attention averaged over the query heads of its KV head; tokens a query cannot see do not count.
    """
    window = int((counted.long().cumsum(-1) > 0).sum(-1).max())  # from the first counted query to the last
    if window == 0:
        return torch.zeros(ctx.keys.shape[:3], device=ctx.keys.device)
    attention = ctx.per_kv_head(last_queries_attention(ctx, window))  # [batch, kv_heads, window, stored]
    stored = ctx.n_stored
    position = torch.arange(stored - window, stored, device=attention.device)
    visible = torch.arange(stored, device=attention.device)[None, :] <= position[:, None]  # [window, stored]
    visible = visible[None, None] if ctx.real is None else visible[None, None] & ctx.real[:, :, None, :]
    average = 1.0 / visible.sum(-1, keepdim=True).clamp(min=1)
    unimportant = visible & (attention < average)
    return (unimportant * counted[:, None, -window:, None].to(attention.device)).sum(2).float()


class Scissorhands(Method):
    """Keeps the tokens that were important most persistently over a history window, and the most recent ones.

    Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV Cache
    Compression at Test Time", NeurIPS 2023, arXiv:2305.17118. Each head holds at most `budget` tokens.
    Over the last `history_window` queries before a compression, every stored token counts the queries
    that found it unimportant (attention below the average 1/t over the t tokens the query saw). When a
    head holds more than the budget, the `drop_ratio` * budget tokens with the highest counts go (ties: the
    later ones), the last `recent_window` never; counts then start again. Acts at prefill (on the last
    queries of the context) and at every decoding step. Defaults: a 400-query history, 10 recent tokens,
    half the budget dropped at once (the paper drops m tokens at a time, m its choice).
    """

    name = "scissorhands"
    phase = "both"

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
