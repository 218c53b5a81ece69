import torch
import torch.nn.functional as F

from ..context import LayerContext, last_queries_attention
from .base import ScorerMethod


def pooled(scores: torch.Tensor, kernel_size: int, pooling: str, among: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth scores along the tokens so that neighbours of an important token are kept with it.

    With `among` (a mask like `scores`), only those tokens are neighbours: they are pooled as one
    sequence with the others left out (padding, a batch row's window), as if these were not there.
    """
    pool = {"max": F.max_pool1d, "avg": F.avg_pool1d}[pooling]
    if among is not None:
        order = (~among).long().argsort(dim=-1, stable=True)  # the tokens pooled first, in order
        filler = float("-inf") if pooling == "max" else 0.0  # what the pooling pads the ends with
        packed = scores.gather(-1, order).masked_fill(~among.gather(-1, order), filler)
        return torch.empty_like(scores).scatter_(-1, order, pooled(packed, kernel_size, pooling))
    batch, heads, n = scores.shape
    out = pool(scores.reshape(batch * heads, 1, n), kernel_size, stride=1, padding=kernel_size // 2)
    return out.view(batch, heads, -1)[..., :n]


def row_windows(ctx: LayerContext, wanted: "int | torch.Tensor") -> torch.Tensor:
    """[batch]: each row's observation window, `wanted` (one width or one per row) at most its new real tokens but
    one and its held tokens but one."""
    new = torch.full((ctx.keys.shape[0],), ctx.n_new) if ctx.new_real is None else ctx.new_real.sum(-1).cpu()
    return torch.as_tensor(wanted).minimum(new - 1).minimum(ctx.held.amax(-1).cpu() - 1).clamp(min=0)


def window_attention(ctx: LayerContext, windows: torch.Tensor, query_weights: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention of each row's last `windows[b]` queries on every stored token, [batch, heads, stored] (each
    query's weights times `query_weights` [batch, heads, widest window], if given), and which stored tokens are
    each row's window, [batch, stored]. `windows` [batch] holds at least one positive width."""
    widest, windows = int(windows.max()), windows.to(ctx.keys.device)
    observing = torch.arange(widest, device=ctx.keys.device)[None, :] >= widest - windows[:, None]  # [batch, widest]
    weights = observing[:, None, :].float() if query_weights is None else observing[:, None, :] * query_weights
    attention = last_queries_attention(ctx, widest).mul_(weights[..., None])  # in place: no fresh pages
    in_window = torch.arange(ctx.n_stored, device=ctx.keys.device)[None, :] >= ctx.n_stored - windows[:, None]
    return attention.sum(dim=2) / windows.clamp(min=1)[:, None, None], in_window


def snapkv_scores(ctx: LayerContext, window_size: int, kernel_size: int, pooling: str) -> torch.Tensor:
    """Attention of the observation window (the last queries) on each earlier token, pooled; window kept.

    In a padded batch each row has its own window (as long as it would be alone): padding queries
    observe nothing and padding keys are no neighbours.
    """
    if ctx.real is None:
        window = min(window_size, ctx.n_new - 1, ctx.n_stored - 1)
        if window < 1:
            return torch.ones(ctx.keys.shape[:-1], device=ctx.keys.device)
        attention = last_queries_attention(ctx, window)[..., :-window]  # [batch, heads, window, earlier]
        scores = ctx.per_kv_head(pooled(attention.mean(dim=2), kernel_size, pooling))
        return F.pad(scores, (0, window), value=float("inf"))
    windows = row_windows(ctx, window_size)
    if int(windows.max()) < 1:
        return torch.ones(ctx.keys.shape[:-1], device=ctx.keys.device)
    mean, in_window = window_attention(ctx, windows)
    earlier = ctx.real & ~in_window[:, None, :]
    group = ctx.group_size
    scores = ctx.per_kv_head(pooled(mean, kernel_size, pooling, earlier.repeat_interleave(group, dim=1)))
    return scores.masked_fill(in_window[:, None, :] & ctx.real, float("inf"))


class SnapKV(ScorerMethod):
    """Keeps the tokens the last `window_size` queries attend to most (pooled), plus that window, per head.

    Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv:2404.14469.
    Defaults are the paper's LongBench setting: a 32-token observation window and max pooling with
    kernel 7. Scores are averaged over the query heads that share a KV head. In kvsqueeze's default
    query-agnostic protocol the window is the end of the context, not the question.
    """

    name = "snapkv"

    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"

    def __post_init__(self):
        super().__post_init__()
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg'; got {self.pooling!r}")

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return snapkv_scores(ctx, self.window_size, self.kernel_size, self.pooling)
