import torch

from .h2o import accumulated_attention
from .merging import MergesEvicted


def merge_into_next(values: torch.Tensor, attention: torch.Tensor, keep: torch.Tensor, evicted: torch.Tensor,
                    merge_budget: int, generator: torch.Generator) -> torch.Tensor:
    """Values [batch, heads, n, dim] where each `evicted` token may have been merged into the kept tokens after it.

    Evicted token i's window is the `merge_budget` positions after it. With probability min(1, A_i / mean of A
    over the kept tokens of its window), A the accumulated `attention`, 1/`merge_budget` of its value is added
    to each kept token of the window (none kept: no merge). Windows are summed by prefix sums over positions,
    so no n x n or n x window tensor is made.
    """
    n = values.shape[2]
    position = torch.arange(n, device=values.device)
    start, end = position + 1, (position + 1 + merge_budget).clamp(max=n)  # window: start <= j < end

    def window_sums(x):  # for each token, the sum of x over its window
        prefix = torch.nn.functional.pad(x.cumsum(-1), (1, 0))
        return prefix[..., end] - prefix[..., start]

    attention, kept = attention.float(), keep.float()
    targets = window_sums(kept)
    window_mean = window_sums(attention * kept) / targets.clamp(min=1)
    probability = torch.where(window_mean > 0, attention / window_mean, (attention > 0).float()).clamp(0, 1)
    probability = probability * (evicted & (targets > 0))
    merged = torch.bernoulli(probability.cpu(), generator=generator).to(values.device)
    share = values.float() * (merged / merge_budget)[..., None]
    # what each token receives: the shares of the evicted tokens at most `merge_budget` positions before it
    prefix = torch.nn.functional.pad(share.cumsum(2), (0, 0, 1, 0))
    received = prefix[:, :, :n] - prefix[:, :, (position - merge_budget).clamp(min=0)]
    return (values.float() + received * kept[..., None]).to(values.dtype)


class CAM(MergesEvicted):
    """Keeps a scorer's best tokens, each evicted value merged, with an attention-based probability, into the next kept ones.

    Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024 (no arXiv id;
    openreview.net/forum?id=LCTmppB165). Keys are evicted as the scorer says (SnapKV by default); the value
    of every evicted token is merged, with probability min(1, A_i / mean A over its merge window), A the
    attention each token accumulated over the context's queries, into the tokens of the next `merge_budget`
    positions of its head: each kept one gets 1/`merge_budget` of it (32 as in KVCache-Factory and kvpress).
    As in the paper's streaming setting, a kept token thus absorbs at most about one token's worth of values,
    whatever the ratio. The Bernoulli draws are seeded. Dense budgets only (one count per head). Inherent cost:
    one more attention pass over the context (the accumulated attention, as H2O's).
    """

    name = "cam"
    extra_work = ("attention",)

    merge_budget: int = 32
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.merge_budget < 1:
            raise ValueError(f"merge_budget must be >= 1; got {self.merge_budget}")
        self.generator = torch.Generator().manual_seed(self.seed)

    def setup(self, model):
        super().setup(model)
        self.generator.manual_seed(self.seed)

    def merged(self, ctx, keep, evicted):
        values = merge_into_next(ctx.values, accumulated_attention(ctx), keep, evicted, self.merge_budget,
                                 self.generator)
        return ctx.keys, values
