"""Which tokens of its context a compressed cache still holds, per layer and KV head.

The cache does not record where its kept tokens came from (it needs no positions: they are in the logical
length). `kept_positions` finds them: it prefills the same context again without compressing, and matches each
token the compressed cache holds with the uncompressed token of the same layer and head that has the same key
and value. After a prefill done in one forward, a kept token's key and value are exactly those of the full
prefill (methods act after each layer has attended), so the match is exact. A quantizer rounds what it
stores but does not change what a method evicts during the prefill: for a quantized context the same method is
run again without it, and that eviction is matched exactly. Where a method changes what is held (merged values,
re-rotated keys, pruned key channels, chunked prefill after its first chunk), or decides after the prefill on a
quantized cache, each held token is matched with the nearest full one: an estimate.
"""

from __future__ import annotations

import torch


def held_tokens(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values, real) of what a cache layer holds: [batch, kv_heads, stored, dim] twice, and which are real
    tokens [batch, kv_heads, stored] (a head-wise layer is shown padded to its longest head)."""
    if layer.compressible:
        keys, values, real = layer.dense_view()
    else:  # a sliding window: what the model's own layer holds
        keys, values, real = layer.keys, layer.values, None
    real = torch.ones(keys.shape[:3], dtype=torch.bool) if real is None else real
    return keys, values, real.to(keys.device)


def fingerprints(rows: torch.Tensor) -> torch.Tensor:
    """One int64 per row of `rows` [..., n, features] that is equal for bit-identical rows (a hash of their bytes)."""
    data = rows.contiguous().view(torch.uint8).long()
    weights = torch.randint(1, 2**62, (data.shape[-1],), generator=torch.Generator().manual_seed(0)) * 2 + 1
    return (data * weights.to(data.device)).sum(-1)  # wraps around modulo 2**64, as intended


def match(held: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """For each row of `held` [m, features], the index of the row of `full` [n, features] it equals (its nearest
    when none is equal)."""
    if not len(held):
        return torch.zeros(0, dtype=torch.long, device=held.device)
    hashes = fingerprints(full)
    order = hashes.argsort()
    found = torch.searchsorted(hashes[order], fingerprints(held)).clamp(max=len(full) - 1)
    index = order[found]
    exact = (full[index] == held).all(-1)
    if not bool(exact.all()):
        rest = ~exact
        index[rest] = torch.cdist(held[rest].float()[None], full.float()[None])[0].argmin(-1)
    return index


def kept_positions(ctx, row: int = 0, reference=None) -> torch.Tensor:
    """[layers, kv_heads, tokens] bool: whether each layer and KV head of `ctx`'s cache holds each token of its
    context (row `row` of a batch; padding left out, so `tokens` is that row's length).

    `ctx` is a `CompressedContext`; its model prefills the context once more, uncompressed, to match against,
    unless `reference` is that uncompressed context already (`compress(..., method=None)` of the same row).
    Exact for methods that keep tokens unchanged from a prefill done in one forward; an estimate otherwise
    (see the module's docstring).
    """
    from .pipeline import compress

    if not 0 <= row < ctx.batch_size:
        raise IndexError(f"row {row} of a batch of {ctx.batch_size} contexts")
    ids = ctx.context_ids[row]
    if ctx.context_mask is not None:
        ids = ids[ctx.context_mask[row].bool().cpu()]
    if reference is None:
        reference = compress(ctx.model, None, ids[None], None, check_window=False)
    elif reference.batch_size != 1 or not torch.equal(reference.context_ids[0].cpu(), ids.cpu()):
        raise ValueError("the reference is not the same context, uncompressed: compress the same text with method=None")
    method = ctx.method
    if ctx.stats.quantizer is not None and not (method is not None and method.has("after_prefill")):
        ctx = reference if method is None else compress(ctx.model, None, ids[None], method, check_window=False)
        row = 0
    layers = []
    for mine, theirs in zip(ctx.cache.layers, reference.cache.layers, strict=True):
        keys, values, real = held_tokens(mine)
        full_keys, full_values, _ = held_tokens(theirs)
        full = torch.cat([full_keys[0], full_values[0]], -1)  # [heads, tokens, features]
        offset = len(ids) - full.shape[1]  # a sliding-window layer holds only the last tokens
        kept = torch.zeros(full.shape[0], len(ids), dtype=torch.bool)
        held = torch.cat([keys[row], values[row]], -1)
        for head in range(full.shape[0]):
            index = match(held[head][real[row, head]].to(full.dtype), full[head])
            kept[head, offset + index.cpu()] = True
        layers.append(kept)
    return torch.stack(layers)
