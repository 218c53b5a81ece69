import torch

from ..context import LayerContext
from .base import Method


def vertical_slash_pattern(query: torch.Tensor, key: torch.Tensor, scaling: float, vertical_size: int, slash_size: int,
                           last_q: int = 64, n_sink: int = 30, n_local: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's (vertical columns, slash offsets), estimated from the attention of its last `last_q` queries.

    query [batch, heads, q, dim] (the last q stored positions), key [batch, heads, stored, dim]. A column scores the
    attention it gets from those queries; a slash (the keys `offset` tokens behind their query) the attention summed
    along its diagonal. The first `n_sink` columns and the `n_local` nearest diagonals always count (MInference's
    kernels). Returns columns [batch, heads, vertical] and offsets [batch, heads, slash].
    """
    stored, window = key.shape[-2], min(last_q, query.shape[-2])
    position = stored - window + torch.arange(window, device=key.device)  # the last queries' stored positions
    offset = position[:, None] - torch.arange(stored, device=key.device)  # [window, stored]: query minus key
    logits = (query[:, :, -window:] @ key.transpose(-1, -2)).float() * scaling
    weights = logits.masked_fill(offset < 0, float("-inf")).softmax(-1)
    vertical = weights.sum(-2)
    vertical[..., :n_sink] = float("inf")
    slash = torch.zeros_like(vertical).scatter_add_(-1, offset.clamp(min=0).expand_as(weights).flatten(-2),
                                                    weights.flatten(-2))
    slash[..., :n_local] = float("inf")
    columns = vertical.topk(min(stored, max(vertical_size, n_sink)), dim=-1).indices
    offsets = slash.topk(min(stored, max(slash_size, 50)), dim=-1).indices
    return columns, offsets


def covered_keys(q_len: int, stored: int, columns: torch.Tensor, offsets: torch.Tensor, block: int = 64
                 ) -> torch.Tensor:
    """[batch, heads, blocks, stored]: the keys each block of `block` queries (the last q_len stored positions) reads
    under a vertical-slash pattern, as MInference's kernel: every key that one of its slash `offsets` reaches from
    one of its rows (contiguous ranges), plus its vertical `columns`, none past the block's last row."""
    batch, heads = offsets.shape[:2]
    n_blocks = -(-q_len // block)
    first = stored - q_len + torch.arange(n_blocks, device=offsets.device) * block  # each block's first row position
    last = (first + block - 1).clamp(max=stored - 1)
    # the range [first - offset, last - offset] of each slash, as +1/-1 marks summed along the keys
    starts = (first[:, None] - offsets[:, :, None, :]).clamp(min=0)  # [batch, heads, blocks, slash]
    ends = last[:, None] - offsets[:, :, None, :] + 1
    reach = (ends > 0).int()
    marks = torch.zeros(batch, heads, n_blocks, stored + 1, dtype=torch.int32, device=offsets.device)
    marks.scatter_add_(-1, starts, reach).scatter_add_(-1, ends.clamp(min=0), -reach)
    covered = marks.cumsum(-1)[..., :stored] > 0
    covered.scatter_(-1, columns[:, :, None, :].expand(-1, -1, n_blocks, -1), True)
    return covered & (torch.arange(stored, device=offsets.device) <= last[:, None])


def vertical_slash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, columns: torch.Tensor,
                             offsets: torch.Tensor, scaling: float, block: int = 64, chunk_elements: int = 2**24
                             ) -> torch.Tensor:
    """Causal attention of `query` [batch, heads, q, dim] (the last q stored positions) over the stored keys that a
    vertical-slash pattern covers (`covered_keys`); key/value [batch, heads, stored, dim] (one per query head).
    Returns [batch, heads, q, dim]. Each block of queries reads only its keys (gathered), a few blocks at a time,
    within about `chunk_elements` gathered numbers.
    """
    batch, heads, q_len, dim = query.shape
    stored = key.shape[-2]
    covered = covered_keys(q_len, stored, columns, offsets, block)
    n_blocks = covered.shape[2]
    counts = covered.sum(-1)
    padded = torch.nn.functional.pad(query, (0, 0, 0, n_blocks * block - q_len)).unflatten(2, (n_blocks, block))
    out = query.new_empty(batch, heads, n_blocks, block, value.shape[-1])
    rows = stored - q_len + torch.arange(n_blocks * block, device=key.device).view(n_blocks, block)  # positions
    for b in range(batch):
        for h in range(heads):
            width = int(counts[b, h].max())
            # covered keys first, in order: a stable sort of the uncovered flags
            index = (~covered[b, h]).to(torch.int8).sort(dim=-1, stable=True).indices[:, :width]  # [blocks, width]
            step = max(1, chunk_elements // max(1, width * (2 * dim + block)))
            for s in range(0, n_blocks, step):
                part = index[s:s + step]
                keys, values = key[b, h][part], value[b, h][part]  # [blocks, width, dim]: the keys this block reads
                logits = torch.bmm(padded[b, h, s:s + step], keys.transpose(1, 2)).float() * scaling
                visible = (torch.arange(width, device=key.device) < counts[b, h, s:s + step, None])[:, None, :]
                visible = visible & (part[:, None, :] <= rows[s:s + step, :, None])
                weights = logits.masked_fill_(~visible, float("-inf")).softmax(-1)  # a row always sees itself
                out[b, h, s:s + step] = torch.bmm(weights.to(values.dtype), values)
    return out.flatten(2, 3)[:, :, :q_len]


class MInference(Method):
    """Keeps the whole cache; prefill attention reads only each head's estimated vertical columns and slash diagonals.

    Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
    Attention", NeurIPS 2024, arXiv:2407.02490. For each head, the attention of the last `last_q` (64)
    queries picks the `vertical_size` key columns and the `slash_size` diagonals (keys a fixed distance
    behind their query) that got the most; prefill attention then reads, per block of 64 queries, only
    the keys these reach, the first 30 tokens and the 100 nearest diagonals always included. Nothing is
    evicted: it changes the prefill's attention (a speed method), and what the cache holds is exact for
    the tokens attended. Defaults are the sizes MInference uses for a head without a searched pattern
    (1000 columns, 6096 diagonals, from its offline search of per-head patterns, here not done: every
    head is vertical-slash). Forwards of at most `last_q` new tokens, and padded batches, attend densely.
    """

    name = "minference"
    phase = "prefill"
    declares = frozenset({"changes_prefill", "attention"})  # its prefill attention is not the model's

    vertical_size: int = 1000
    slash_size: int = 6096
    last_q: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.vertical_size < 1 or self.slash_size < 1 or self.last_q < 1:
            raise ValueError(f"MInference needs positive sizes; got {self.vertical_size}, {self.slash_size}, "
                             f"{self.last_q}")

    def attend(self, layer, call):
        query, key, value, kwargs = call.query, call.key, call.value, call.kwargs
        stored = key.shape[-2]
        if query.shape[-2] <= self.last_q or layer.fresh_valid is not None or max(self.slash_size, 50) >= stored:
            return None  # a short forward, padding, or every diagonal read: dense attention is the same
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise NotImplementedError("MInference does not support attention softcapping or sinks")
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        columns, offsets = vertical_slash_pattern(query, key, scaling, self.vertical_size, self.slash_size, self.last_q)
        out = vertical_slash_attention(query, key, value, columns, offsets, scaling)
        return out.transpose(1, 2).contiguous(), None

    def compress(self, ctx: LayerContext) -> None:
        pass  # nothing is evicted
