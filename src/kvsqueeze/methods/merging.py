import torch
import torch.nn.functional as F

from ..context import LayerContext
from .base import ScorerWrapper


def positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of `mask`'s tokens [batch, heads, n], in order, padded to the longest (batch, head), and which
    of them are real (not padding)."""
    count = mask.sum(-1)
    order = (~mask).to(torch.uint8).argsort(dim=-1, stable=True)[..., :int(count.max())]
    return order, torch.arange(order.shape[-1], device=mask.device) < count[..., None]


def nearest_kept(keys: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor, chunk: int = 256
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the `evicted` tokens of `keys` [batch, heads, n, dim]: their positions, which of them are real (as
    `positions` gives them), the kept token of their head whose key is most cosine-similar, and that similarity,
    each [batch, heads, evicted]. Only evicted x kept similarities are computed (a quarter of the n x n matrix at
    ratio 0.5), `chunk` evicted tokens at a time into one buffer (it stays in cache, no fresh pages mapped for
    it); ties go to the oldest."""
    normalized = F.normalize(keys.float(), dim=-1)
    (kept, kept_real), (gone, gone_real) = positions(keep), positions(evicted)
    target = torch.zeros_like(gone)
    similarity = torch.zeros(gone.shape, device=keys.device)
    if kept.shape[-1] == 0 or gone.shape[-1] == 0:
        return gone, gone_real, target, similarity
    gather = lambda index: normalized.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
    kept_keys = gather(kept).transpose(-1, -2)
    buffer = torch.empty(*kept.shape[:2], min(chunk, gone.shape[-1]), kept.shape[-1], device=keys.device)
    for start in range(0, gone.shape[-1], chunk):
        index = gone[..., start:start + chunk]
        sims = torch.matmul(gather(index), kept_keys, out=buffer[:, :, :index.shape[-1]])  # [batch, heads, chunk, kept]
        if not bool(kept_real.all()):
            sims.masked_fill_(~kept_real[:, :, None, :], float("-inf"))
        best = sims.max(-1)
        target[..., start:start + chunk] = kept.gather(2, best.indices)
        similarity[..., start:start + chunk] = best.values
    return gone, gone_real, target, similarity


def merge_evicted(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor, mode: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [batch, heads, n, dim] where every kept token has absorbed the evicted tokens closest to it.

    Each `evicted` token goes to the kept token of its head whose key is most cosine-similar. "pivot":
    the kept token becomes the mean of itself and, for each token merged into it, the average of the two;
    "weighted": the mean of itself and the merged tokens, each weighted by (similarity + 1) / 2.
    """
    gone, real, target, similarity = nearest_kept(keys, keep, evicted)
    weight = real.float() * (((similarity + 1) / 2).clamp(min=1e-6) if mode == "weighted" else 1.0)  # padding: 0
    counts = torch.zeros(keys.shape[:-1], device=keys.device).scatter_add_(2, target, weight)

    def absorb(states):
        states = states.float()
        rows = lambda index: index[..., None].expand(*index.shape, states.shape[-1])
        incoming = states.gather(2, rows(gone))
        if mode == "pivot":
            incoming = (incoming + states.gather(2, rows(target))) / 2
        sums = torch.zeros_like(states).scatter_add_(2, rows(target), incoming * weight[..., None])
        return sums.add_(states).div_(1 + counts[..., None]).to(keys.dtype)  # in place: no fresh pages

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

    Inherent cost: finding each evicted token's nearest kept token, the cosine of every evicted key with every
    kept key of its head and the largest per evicted token: at ratio 0.5 a quarter of the n x n products of the
    keys, over the KV heads (0.3-0.4 s of a 4,096-token prefill's 6 s on the bundled model, 2 threads), growing
    with the square of the context as attention does.
    """

    name = "merging"
    extra_work = ("similarity",)

    merge: str = "weighted"

    def __post_init__(self):
        super().__post_init__()
        if self.merge not in ("pivot", "weighted"):
            raise ValueError(f"merge is 'pivot' or 'weighted'; got {self.merge!r}")

    def merged(self, ctx, keep, evicted):
        return merge_evicted(ctx.keys, ctx.values, keep, evicted, self.merge)
