import math

import torch

from ..budgets import top_k_mask
from ..convert import as_squeeze_cache
from ..hooks import attach
from ..context import LayerContext
from .base import ScorerMethod


class KNorm(ScorerMethod):
    """Keeps the tokens whose keys have the smallest L2 norm, per head.

    Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    EMNLP 2024, arXiv:2406.11430: a low key norm goes with high attention. See also `l2_compress`,
    the paper's own entry point.
    """

    name = "knorm"

    def score(self, ctx: LayerContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)


def l2_compress(past_key_values, keep_ratio: float = 1.0, prune_after: int = 2048, skip_layers=(), model=None):
    """Compress a filled cache by key norm, with the semantics of the L2-norm paper's own function.

    Every layer not in `skip_layers` that holds at least `prune_after` tokens keeps
    ceil(keep_ratio * tokens) tokens per head, those with the smallest key norm. Unlike the paper's
    code, kept tokens stay in their original order (attention does not depend on it: positions are
    already in the keys). Takes a transformers `Cache` (e.g. `outputs.cache`), a
    `SqueezeCache` or a list of (keys, values); returns a new `SqueezeCache` (evicted tokens are
    freed once the input cache is dropped) that remembers the logical length, so the next forward
    continues at the right positions.

    Skipped or short layers keep more tokens than the others, and a multi-token forward on such a
    cache needs each layer's own mask: pass `model=` to route the model's attention through kvsqueeze
    for good (`kvsqueeze.hooks.attach`; `kvsqueeze.hooks.detach(model)` gives it back), or run the model
    inside `with kvsqueeze.attached(model):`.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio is the fraction of tokens kept and must be in (0, 1]; got {keep_ratio}")
    if prune_after < 0:
        raise ValueError(f"prune_after must be >= 0; got {prune_after}")
    if model is not None:
        attach(model)
    cache = as_squeeze_cache(past_key_values)
    for index in cache.compressible:
        if index in set(skip_layers) or cache.layers[index].stored < max(prune_after, 1):
            continue
        keys, _, real = cache.layers[index].dense_view()
        n_keep = math.ceil(keep_ratio * keys.shape[-2])
        if n_keep < keys.shape[-2]:
            norms = -keys.float().norm(dim=-1)
            cache.keep(index, top_k_mask(norms if real is None else norms.masked_fill(~real, float("-inf")), n_keep))
    cache.quantize()  # the layers of a transformers quantized cache are stored quantized again
    return cache
