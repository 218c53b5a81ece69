import torch

from ..budgets import top_k_per_head
from .kvzip import ReplayMethod, observe, real_positions, rows
from .reconstruction import Reconstruction, attention_to


class KVCompose(ReplayMethod):
    """Keeps, in every head of a layer, the same number of its own most-attended tokens, layer budgets set by composite tokens.

    Akulov et al., "KVCompose: Efficient Structured KV Cache Compression with Composite Tokens",
    arXiv:2509.05165. After the prefill the context is fed once more after itself; a token scores the
    most attention any query of that second pass pays it (`agg_task` max), averaged over the query
    heads of its KV head (`agg_group` mean), plus the mean over the layer's KV heads (as kvpress).
    Each head ranks its tokens by its own scores; the j-th composite token of a layer is the j-th best
    token of each head, scored by their mean (`agg_head`). The budget (the uniform one times the
    layers) goes to the best composite tokens over all layers (the first layer keeps the most, at
    least one token per layer), so each layer is a dense [heads, kept, dim] cache whose slot j holds a
    different token in each head, and layers differ in length. `structured=False` lets each head keep
    its own number (ragged). Defaults are kvpress's. Inherent cost: a second forward over the context on a
    temporary fork of the cache (twice the context, freed afterwards), as KVzip's reconstruction (about 2x a
    plain prefill, more where attention dominates); the scores come from that forward's own attention
    (`reconstruction`), a few queries at a time.
    """

    name = "kvcompose"

    structured: bool = True
    agg_task: str = "max"
    agg_group: str = "mean"
    agg_head: str = "mean"
    add_v_norm: bool = False
    add_mean_across_heads: bool = True
    keep_token_lower_bound: int = 0

    def __post_init__(self):
        super().__post_init__()
        for what in ("agg_task", "agg_group", "agg_head"):
            if getattr(self, what) not in ("max", "mean"):
                raise ValueError(f"{what} is 'max' or 'mean'; got {getattr(self, what)!r}")

    def decide(self, model, cache, ids, attention_mask, prompt, layers, seen):
        scores = self.scores(model, cache, ids, attention_mask)
        stacked = torch.stack([scores[i] for i in layers], 1)  # [batch, layers, kv_heads, stored], padding -inf
        for i, keep in zip(layers, self.keep_masks(stacked, seen).unbind(1)):
            cache.keep(i, keep)

    def scores(self, model, cache, ids, attention_mask=None) -> dict[int, torch.Tensor]:
        """{layer: [batch, kv_heads, stored]}: the attention each token gets from the second pass (padding -inf)."""
        scores: dict[int, torch.Tensor] = {}
        for b, fork, real_ids, mask in rows(cache, ids, attention_mask):
            attention = Reconstruction(end=len(real_ids))  # every real token is scored

            def score_layer(ctx):
                positions = real_positions(ctx)
                if ctx.layer_idx not in scores:
                    shape = (ids.shape[0], ctx.n_kv_heads, ctx.n_stored - ctx.n_new)
                    scores[ctx.layer_idx] = torch.full(shape, float("-inf"), device=ctx.keys.device)
                seen_by = attention_to(ctx, positions, reduce=self.agg_task,
                                       normaliser=attention.normaliser(ctx, positions))
                grouped = seen_by.view(1, ctx.n_kv_heads, ctx.group_size, -1)
                token = grouped.amax(2) if self.agg_group == "max" else grouped.mean(2)
                if self.add_v_norm:
                    token = token * ctx.values[:, :, positions].float().norm(dim=-1)
                if self.add_mean_across_heads:
                    token = token + token.mean(1, keepdim=True)
                scores[ctx.layer_idx][b][:, positions] = token[0]
            observe(model, fork, real_ids[None], score_layer, mask, start=len(real_ids), attention=attention)
        return scores

    def keep_masks(self, scores: torch.Tensor, seen: list[int]) -> torch.Tensor:
        """Keep-masks [batch, layers, kv_heads, stored] from scores of the same shape (padding -inf)."""
        batch, n_layers, heads, stored = scores.shape
        ranked = scores.sort(-1, descending=True).values  # a head's j-th best score: its part of composite token j
        bonus = (torch.arange(stored, device=scores.device) < self.keep_token_lower_bound) * 1e9
        totals = torch.tensor([self.allocation.n_keep(n) * n_layers for n in seen], device=scores.device)
        if self.structured:
            composite = ranked.mean(2) if self.agg_head == "mean" else ranked.amax(2)  # [batch, layers, stored]
            composite = composite + bonus
            composite[:, 0] = composite.amax(1)  # the first layer keeps the most
            chosen = top_k_per_head(composite.flatten(1)[:, None], totals[:, None])[:, 0].view_as(composite)
            counts = chosen.sum(-1).clamp(min=max(1, self.keep_token_lower_bound))[:, :, None].expand(-1, -1, heads)
        else:
            chosen = top_k_per_head((ranked + bonus).flatten(1)[:, None], totals[:, None] * heads)[:, 0]
            counts = chosen.view_as(ranked).sum(-1)
        return top_k_per_head(scores, counts.clamp(max=stored))

