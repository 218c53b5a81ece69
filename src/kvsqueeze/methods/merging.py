import torch
import torch.nn.functional as F

from ..context import LayerContext
from .base import ScorerWrapper


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor, mode: str,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [batch, heads, n, dim] where every kept token has absorbed the evicted tokens closest to it.

    Each `evicted` token goes to the kept token of its head whose key is most cosine-similar. "pivot":
    the kept token becomes the mean of itself and, for each token merged into it, the average of the two;
    "weighted": the mean of itself and the merged tokens, each weighted by (similarity + 1) / 2.
    """
    normalized = F.normalize(keys.float(), dim=-1)
    target = torch.zeros(keys.shape[:-1], dtype=torch.long, device=keys.device)
    similarity = torch.zeros(keys.shape[:-1], device=keys.device)
    for start in range(0, keys.shape[2], chunk):  # n x n similarities, a chunk of rows at a time
        sims = normalized[:, :, start:start + chunk] @ normalized.transpose(-1, -2)
        best = sims.masked_fill(~keep[:, :, None, :], float("-inf")).max(-1)
        similarity[:, :, start:start + chunk], target[:, :, start:start + chunk] = best.values, best.indices
    weight = evicted.float() * (((similarity + 1) / 2).clamp(min=1e-6) if mode == "weighted" else 1.0)

    def absorb(states):
        states = states.float()
        incoming = states if mode == "weighted" else (states + states.gather(2, target[..., None].expand_as(states))) / 2
        sums = torch.zeros_like(states).scatter_add_(2, target[..., None].expand_as(states), incoming * weight[..., None])
        counts = torch.zeros_like(weight).scatter_add_(2, target, weight)
        return ((states + sums) / (1 + counts[..., None])).to(keys.dtype)

    return absorb(keys), absorb(values)


class MergesEvicted(ScorerWrapper):
    """Keeps a scorer's best tokens, the evicted ones merged into the kept ones as `merged` says (Merging, CAM)."""

    def compress(self, ctx: LayerContext) -> None:
        over = self.rows_over_budget(ctx)
        if not bool(over.any()):
            return
        keep = ctx.in_rows(self.keep_mask(ctx), over)
        keys, values = self.merged(ctx, keep, ~keep if ctx.real is None else ctx.real & ~keep)
        ctx.keep(keep, keys=keys, values=values)

    def merged(self, ctx: LayerContext, keep: torch.Tensor, evicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored keys and values, the `keep` ones [batch, kv_heads, stored] having absorbed the `evicted` ones."""
        raise NotImplementedError


class Merging(MergesEvicted):
    """Keeps a scorer's best tokens, each merged with the evicted tokens whose keys are most similar to its own.

    Merging instead of dropping, in the two forms KVCache-Factory offers: "pivot" (LOOK-M's averaging,
    Wan et al., arXiv:2406.18139) and "weighted" (KVMerger's similarity-weighted merging, Wang et al.,
    "Model Tells You Where to Merge", arXiv:2407.08454): every evicted token is assigned to the kept token
    of its head with the most cosine-similar key, and the kept key and value absorb it. SnapKV chooses
    what is kept by default. Dense budgets only (one count per head).
    """

    name = "merging"

    merge: str = "weighted"

    def __post_init__(self):
        super().__post_init__()
        if self.merge not in ("pivot", "weighted"):
            raise ValueError(f"merge is 'pivot' or 'weighted'; got {self.merge!r}")

    def merged(self, ctx, keep, evicted):
        return merge_evicted(ctx.keys, ctx.values, keep, evicted, self.merge)
