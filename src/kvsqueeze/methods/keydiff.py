import torch
import torch.nn.functional as F

from ..context import LayerContext
from .base import ScorerMethod


class KeyDiff(ScorerMethod):
    """Keeps the tokens whose keys differ most (in cosine) from the layer's mean key direction, per head.

    Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
    Resource-Constrained Environments", arXiv:2504.15364. The anchor is the mean of the normalised keys.
    """

    name = "keydiff"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        keys = F.normalize(ctx.keys.float(), dim=-1)
        if ctx.real is None:
            anchor = keys.sum(2, keepdim=True) / keys.shape[2]
        else:
            real = ctx.real.float()
            anchor = (keys * real[..., None]).sum(2, keepdim=True) / real.sum(-1)[..., None, None].clamp(min=1)
        return -(keys * F.normalize(anchor, dim=-1)).sum(-1)
