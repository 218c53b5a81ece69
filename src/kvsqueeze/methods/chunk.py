from collections.abc import Iterator
from functools import cached_property

import torch

from ..budgets import largest_remainder, top_k_per_head
from ..context import LayerContext
from .base import ScorerWrapper


class TokenSubset(LayerContext):
    """A layer seen as if one batch row (and one KV head) held only some of its tokens, for a scorer to score.

    Every token counts as new: keys, values, queries, hidden states and rotary embeddings are those of the
    subset, in order; `row_lengths` stays the row's logical length (future positions follow the whole context).
    What the scorer does not read is never gathered (a key-only scorer costs no copy of the hidden states).
    """

    def __init__(self, ctx: LayerContext, row: int, index: torch.Tensor, head: int | None = None):
        self.parent, self.row, self.index, self.head = ctx, row, index, head
        self.heads = slice(None) if head is None else slice(head, head + 1)
        self.module, self.cache, self.rotary_embedding = ctx.module, ctx.cache, ctx.rotary_embedding
        self.__post_init__()

    @cached_property
    def query_heads(self) -> slice:
        size = self.parent.group_size
        return slice(None) if self.head is None else slice(self.head * size, (self.head + 1) * size)

    def gathered(self, states: torch.Tensor) -> torch.Tensor:
        return states[self.row:self.row + 1, self.heads].index_select(2, self.index)

    @cached_property
    def keys(self) -> torch.Tensor:
        return self.gathered(self.parent.keys)

    @cached_property
    def values(self) -> torch.Tensor:
        return self.gathered(self.parent.values)

    @property
    def real(self) -> None:
        return None

    def view(self):
        return self.keys, self.values, None

    @cached_property
    def hidden_states(self) -> torch.Tensor:
        return self.parent.hidden_states[self.row:self.row + 1, self.index]

    @cached_property
    def position_embeddings(self):
        rotary = self.parent.position_embeddings
        return None if rotary is None else tuple(t[min(self.row, t.shape[0] - 1)][self.index][None] for t in rotary)

    @cached_property
    def attention_weights(self):
        weights = self.parent.attention_weights
        return None if weights is None else weights[self.row:self.row + 1, self.query_heads][:, :, self.index][..., self.index]

    @cached_property
    def observed_queries(self):
        queries = self.parent.observed_queries
        return None if queries is None else queries[self.row:self.row + 1, self.query_heads][:, :, self.index]

    @property
    def n_new(self) -> int:
        return len(self.index)

    @cached_property
    def row_lengths(self) -> torch.Tensor:
        return self.parent.row_lengths[self.row:self.row + 1]

    @property
    def new_real(self):
        return None

    def keep(self, mask, rows=None, keys=None, values=None):
        raise RuntimeError("a token subset is scored, not compressed")


def token_subset(ctx: LayerContext, row: int, index: torch.Tensor, head: int | None = None) -> TokenSubset:
    """Tokens `index` (stored positions) of batch row `row`, all KV heads or only `head`. The layer must hold only
    this forward's tokens (a context compressed in one forward)."""
    return TokenSubset(ctx, row, index, head)


def single_forward_rows(ctx: LayerContext, method: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(row, its logical length, the stored positions of its real tokens) for every batch row of a layer that holds
    only this forward's tokens (a context compressed in one forward; `method` names the caller in the error)."""
    if ctx.n_stored != ctx.n_new:
        raise ValueError(f"{method} compresses a context prefilled in one forward; this layer holds "
                         f"{ctx.n_stored - ctx.n_new} earlier tokens (use it without chunk_size)")
    real = ctx.real
    for row, seen in enumerate(ctx.row_lengths.tolist()):
        if real is None:
            yield row, seen, torch.arange(ctx.n_stored, device=ctx.keys.device)
        else:
            yield row, seen, real[row, 0].nonzero()[:, 0]  # before any compression every head holds the same tokens


class Chunk(ScorerWrapper):
    """Keeps the same share of every `chunk_length`-token chunk of the context: the chunk's best by a scorer run on that chunk alone.

    ChunkPress of kvpress, from Finch (Corallo & Papotti, "FINCH: Prompt-guided Key-Value Cache Compression
    for Large Language Models", TACL 2024, arXiv:2408.00167): the context is cut into consecutive chunks of
    `chunk_length` tokens (1024, kvpress's default) and the scorer scores each chunk as if the layer held only
    that chunk (its keys, values and queries), so every part of the context is compressed at the same ratio
    instead of the scorer's favourite regions taking the whole budget. All in one prefill, after the whole
    context has been attended to; not chunked prefill (`compress(..., chunk_size=)`), where each chunk attends
    only to what was kept of the earlier ones. The layer's budget is split among the chunks by their
    length (the exact total, where kvpress rounds down in every chunk). SnapKV is the default scorer.
    """

    name = "chunk"
    declares = frozenset({"whole_context"})

    chunk_length: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_length < 1:
            raise ValueError(f"chunk_length must be >= 1; got {self.chunk_length}")

    def keep_mask(self, ctx: LayerContext) -> torch.Tensor:
        mask = torch.zeros(ctx.keys.shape[:-1], dtype=torch.bool, device=ctx.keys.device)
        for row, seen, tokens in single_forward_rows(ctx, "Chunk"):
            chunks = tokens.split(self.chunk_length)
            sizes = torch.tensor([[len(c) for c in chunks]], dtype=torch.float)
            total = torch.tensor([self.allocation.n_keep(seen, *ctx.depth)])
            counts = largest_remainder(sizes * total / len(tokens), total)[0].tolist()
            for chunk, count in zip(chunks, counts):
                scores = self.scorer.scores(token_subset(ctx, row, chunk))  # [1, kv_heads, chunk]
                kept = top_k_per_head(scores, torch.full(scores.shape[:2], count, device=scores.device))
                mask[row, :, chunk] = kept[0]
        return mask
