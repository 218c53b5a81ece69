"""How contexts are laid out for a prefill: chunks, and batches of contexts of different lengths (left padding)."""

from __future__ import annotations

import torch


def chunks(n_tokens: int, chunk_size: int | None) -> list[slice]:
    """Consecutive slices of at most `chunk_size` tokens; a last chunk of one token joins the one before, so
    every forward is a multi-token (prefill) forward."""
    if chunk_size is None or chunk_size >= n_tokens:
        return [slice(0, n_tokens)]
    if chunk_size < 2:
        raise ValueError(f"chunk_size must be at least 2 tokens; got {chunk_size}")
    starts = list(range(0, n_tokens, chunk_size))
    if n_tokens - starts[-1] == 1:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n_tokens])]


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows of different lengths as one [batch, longest] tensor padded on the left, and its attention mask."""
    longest = max(len(row) for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, -len(row):], mask[i, -len(row):] = row, 1
    return ids, mask


def pack(rows: list[torch.Tensor], chunk_size: int | None, pad_id: int, aligned: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor | None, list[slice]]:
    """Lay out a batch of contexts for prefill: (ids [batch, width], attention mask or None, one span per forward).

    `aligned`: each row is cut into the chunks it would get alone; the j-th chunks of all rows are
    left-padded to a common width, and rows with fewer chunks start later. Every row thus goes through
    exactly the forwards and compressions it would go through alone, padding aside. Otherwise the
    rows are left-padded as a whole and the chunks cut across them (padding only at the start).
    """
    if not aligned:
        ids, mask = left_pad(rows, pad_id)
        return ids, None if bool(mask.all()) else mask, chunks(ids.shape[1], chunk_size)
    per_row = [chunks(len(row), chunk_size) for row in rows]
    steps = max(len(parts) for parts in per_row)
    per_row = [[slice(0, 0)] * (steps - len(parts)) + parts for parts in per_row]
    pieces = [left_pad([row[parts[j]] for row, parts in zip(rows, per_row)], pad_id) for j in range(steps)]
    ids, mask = torch.cat([p[0] for p in pieces], 1), torch.cat([p[1] for p in pieces], 1)
    ends = torch.tensor([p[0].shape[1] for p in pieces]).cumsum(0).tolist()
    return ids, None if bool(mask.all()) else mask, [slice(a, b) for a, b in zip([0] + ends[:-1], ends)]
