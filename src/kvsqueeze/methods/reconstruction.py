"""What KVzip and its family (KVCompose, KVgrad, RestoreKV) share: the attention of their reconstruction forward, and
the attention probabilities they score from, with no softmax over the cache computed or held twice.

A reconstruction forward feeds the context again after the full cache; a stored pair's score is the attention the
new queries pay it, the softmax being over the scored stored tokens and the new ones. `Reconstruction` is that
forward's attention: the model's own, computed as exactly merged parts whose fused kernels also give each query's
log softmax normaliser; `attention_to` turns it into probabilities with one matrix product, a few queries at a time.
"""

import torch

from ..context import LayerContext
from .base import Method

# what sdpa runs on CPU, which also gives each query's log normaliser (a private op: without it, no fused pass)
KERNEL = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
KERNEL_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class MergedAttention(torch.autograd.Function):
    """Attention of `query` [batch, heads, q, dim] over disjoint key sets (keys, values as many heads; `causal[i]`:
    set i is the query's own tokens, seen causally), from each set's fused attention: (output, log normalisers
    [sets, batch, heads, q] in float32). The sets' outputs are merged exactly by their normalisers. Differentiable:
    each set's backward is the kernel's, given the merged output and its share of the output gradient (so the
    normalisers need no gradient of their own, which the kernel does not give)."""

    @staticmethod
    def forward(ctx, query, scale, causal, *keys_values):
        parts = [KERNEL(query, key, value, is_causal=c, scale=scale)
                 for key, value, c in zip(keys_values[::2], keys_values[1::2], causal)]
        lses = torch.stack([lse for _, lse in parts])  # float32 (float64 for float64 queries)
        weights = (lses - lses.logsumexp(0)).exp()
        out = sum(o.to(w.dtype) * w[..., None] for (o, _), w in zip(parts, weights)).to(query.dtype)
        ctx.save_for_backward(query, out, lses, weights, *keys_values)
        ctx.scale, ctx.causal = scale, causal
        ctx.mark_non_differentiable(lses)
        return out, lses

    @staticmethod
    def backward(ctx, grad_out, _):
        query, out, lses, weights, *keys_values = ctx.saved_tensors
        grad_query, grads = torch.zeros_like(query), []
        for i, causal in enumerate(ctx.causal):
            share = (grad_out.to(weights.dtype) * weights[i][..., None]).to(query.dtype)
            found = KERNEL_BACKWARD(share, query, keys_values[2 * i], keys_values[2 * i + 1], out, lses[i], 0.0, causal,
                                    scale=ctx.scale)
            grad_query += found[0]
            grads += found[1:]
        return (grad_query, None, None, *grads)


class Reconstruction(Method):
    """The attention of a reconstruction forward, on dense layers: exactly the model's (every stored token, and the new
    ones causally), computed as merged parts (the new tokens, causally; the scored stored tokens: the first `sink`
    real ones and the real ones `start`..`end`; the other stored ones) whose fused kernels also give each query's
    log softmax normaliser over the scored tokens and the new ones (`normaliser`). The causal part skips its
    future, which the model's masked attention cannot. On CPU, where the kernel gives the normaliser; where a layer's
    attention is not the plain one (a window, padding among the new tokens, softcapping, attention sinks, a
    ragged layer) or on another device, the model's own runs and nothing is recorded."""

    declares = frozenset({"attention"})

    sink: int = 0
    start: int = 0
    end: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.normalisers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer: (scored stored tokens, lse)
        self.checked: tuple = (None, None)  # (the last mask seen, what it shows): transformers makes one per forward

    def acts_on(self, ctx):
        return False

    def normaliser(self, ctx: LayerContext, columns: torch.Tensor) -> torch.Tensor | None:
        """[batch, heads, new]: the log normaliser recorded for this layer over `columns` and the new tokens, if any."""
        found = self.normalisers.get(ctx.layer_idx)
        return found[1] if found is not None and torch.equal(found[0], columns.to(found[0].device)) else None

    def visible(self, mask, n_new: int, n_old: int) -> torch.Tensor | None:
        """[n_old]: the stored tokens every new query sees, when the mask shows just those and the new ones causally."""
        if mask is None:
            return torch.ones(n_old, dtype=torch.bool)
        if self.checked[0] is mask:
            return self.checked[1]
        visible = None
        if mask.dim() == 4 and mask.shape[0] == 1 and mask.shape[-2:] == (n_new, n_old + n_new):
            allowed = (mask if mask.dtype == torch.bool else mask == 0)[0]
            stored = allowed[0, -1, :n_old]
            causal = torch.ones(n_new, n_new, dtype=torch.bool, device=mask.device).tril()
            if bool(allowed[..., :n_old].eq(stored).all()) and bool(allowed[..., n_old:].eq(causal).all()):
                visible = stored
        self.checked = (mask, visible)
        return visible

    def attend(self, layer, call):
        query, key, value, kwargs = call.query, call.key, call.value, call.kwargs
        batch, heads, n_new, _ = query.shape
        n_old = key.shape[-2] - n_new
        plain = (query.device.type == "cpu" and KERNEL_BACKWARD is not None and batch == 1 and n_old > 0 and kwargs.get("dropout", 0.0) == 0.0
                 and all(kwargs.get(name) is None for name in ("sliding_window", "softcap", "s_aux", "sinks")))
        visible = self.visible(call.mask, n_new, n_old) if plain else None
        if visible is None:
            return None
        positions = visible.nonzero()[:, 0].to(key.device)
        scored = torch.cat([positions[:self.sink], positions[self.start:self.end]])
        rest = torch.cat([positions[self.sink:self.start], positions[self.end:]])
        group = heads // key.shape[1]
        keys_values, causal = [], []
        for index in (None, scored, rest):  # the new tokens, then the scored ones: the normaliser's first two parts
            if index is None or len(index):
                part = slice(n_old, None) if index is None else index
                keys_values += [states[:, :, part].repeat_interleave(group, 1) for states in (key, value)]
                causal.append(index is None)
        out, lses = MergedAttention.apply(query, kwargs.get("scaling", getattr(call.module, "scaling", None)),
                                          tuple(causal), *keys_values)
        self.normalisers[call.module.layer_idx] = (scored, lses[:1 + bool(len(scored))].logsumexp(0))
        return out.transpose(1, 2).contiguous(), None


def log_normaliser(ctx: LayerContext, columns: torch.Tensor, block: int = 256) -> torch.Tensor:
    """[batch, heads, new]: log of each new query's softmax normaliser over the stored tokens `columns` and the new
    ones (causal), `block` queries at a time: where the reconstruction's attention recorded none."""
    batch, heads, n_new, dim = ctx.queries.shape
    n_columns = len(columns)
    queries = (ctx.queries.float() * ctx.scaling).view(batch, ctx.n_kv_heads, ctx.group_size, n_new, dim)
    keys = torch.cat([ctx.keys[:, :, columns], ctx.keys[:, :, -n_new:]], 2).float()
    found = []
    for start in range(0, n_new, block):
        end = min(start + block, n_new)  # the new tokens after `end` are in every query's future: left out
        part = queries[:, :, :, start:end].reshape(batch, ctx.n_kv_heads, -1, dim)
        logits = (part @ keys[:, :, :n_columns + end].transpose(-1, -2)).view(batch, heads, end - start, -1)
        future = torch.arange(end, device=keys.device)[None, :] > torch.arange(start, end, device=keys.device)[:, None]
        logits[..., n_columns:] = logits[..., n_columns:].masked_fill(future, float("-inf"))
        found.append(logits.logsumexp(-1))
    return torch.cat(found, -1)


def attention_to(ctx: LayerContext, columns: torch.Tensor, query_weights: torch.Tensor | None = None,
                 reduce: str = "max", normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, heads, len(columns)]: the most (`reduce="max"`) or the mean attention the new queries of this forward
    pay to each stored token `columns`, the softmax being over those tokens and the new ones (causal).
    `query_weights` [batch, new] scale each query's probabilities first. `normaliser` [batch, heads, new]: each
    query's log softmax normaliser (`Reconstruction.normaliser`; else computed here). A probability is
    exp(scale q.k - normaliser + log weight): one matrix product with the normaliser as an extra channel, then the
    max over queries before a single exp (or an exp and a sum), a few queries at a time so that the block stays in
    cache: no softmax over all stored tokens is materialised."""
    batch, heads, n_new, dim = ctx.queries.shape
    kv, group, n_columns = ctx.n_kv_heads, ctx.group_size, len(columns)
    offset = -(log_normaliser(ctx, columns) if normaliser is None else normaliser).float()
    if query_weights is not None:
        offset = offset + query_weights.float().clamp(min=torch.finfo(torch.float32).tiny).log()[:, None, :]
    queries = torch.cat([ctx.queries.float() * ctx.scaling, offset[..., None]], -1)
    queries = queries.view(batch, kv, group, n_new, dim + 1)
    keys = ctx.keys[:, :, columns].float()
    keys = torch.cat([keys, keys.new_ones(*keys.shape[:-1], 1)], -1).transpose(-1, -2)  # [batch, kv, dim + 1, columns]
    block = max(8, min(512, 2 ** 19 // max(1, group * n_columns)))  # ~2 MiB of logits
    best = torch.full((batch, kv, group, n_columns), float("-inf") if reduce == "max" else 0.0, device=keys.device)
    for start in range(0, n_new, block):
        end = min(start + block, n_new)
        logits = queries[:, :, :, start:end].reshape(batch, kv, -1, dim + 1) @ keys
        logits = logits.view(batch, kv, group, -1, n_columns)
        best = torch.maximum(best, logits.amax(3)) if reduce == "max" else best + logits.exp_().sum(3)
    best = best.view(batch, heads, n_columns)
    return best.exp() if reduce == "max" else best / n_new
