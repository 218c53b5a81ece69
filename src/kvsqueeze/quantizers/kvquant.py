"""KVQuant-style quantization (Hooper et al. 2024, arXiv:2401.18079): non-uniform levels, dense-and-sparse."""

import torch

from .base import Quantizer, add_outliers, masked_range, pack_bits, split_outliers, unpack_bits


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """The points halfway between consecutive sorted `levels` [n, L]: [n, L - 1]."""
    return (levels[:, 1:] + levels[:, :-1]) / 2


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted `levels` [n, L] for every value of x [n, m] (uint8; a value halfway
    between two levels takes the lower): how many midpoints lie below it, one comparison per midpoint (on a CPU
    several times faster than a binary search per value)."""
    halfway = midpoints(levels)
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j in range(halfway.shape[1]):
        index += x > halfway[:, j:j + 1]
    return index


def fit_levels(x: torch.Tensor, valid: torch.Tensor, n_levels: int, iterations: int = 8) -> torch.Tensor:
    """Per page, `n_levels` sorted levels fitted to the values of x [n, ...] by 1-D k-means (Lloyd).

    Starts from the quantiles, so the levels follow the distribution (denser where values are). On the sorted
    values each level's members are a run between two midpoints, so an iteration finds the runs' ends (a search
    per midpoint) and their sums from prefix sums, not a search and a scatter per value.
    """
    n = x.shape[0]
    flat, keep = x.reshape(n, -1), valid.expand_as(x).reshape(n, -1)
    ordered = flat.masked_fill(~keep, float("inf")).sort(-1).values  # the valid values first, ascending
    count = keep.sum(-1, keepdim=True)
    at = (torch.linspace(0, 1, n_levels, device=x.device)[None, :] * (count.clamp(min=1) - 1)).round().long()
    levels = ordered.gather(1, at).masked_fill(count == 0, 0)
    valid_sorted = torch.arange(ordered.shape[1], device=x.device) < count
    prefix = torch.nn.functional.pad(ordered.where(valid_sorted, 0).double().cumsum(-1), (1, 0))
    for _ in range(iterations):
        # level k holds the values above midpoint k - 1 up to midpoint k (one on a midpoint: the lower level)
        ends = torch.cat([torch.searchsorted(ordered, midpoints(levels), right=True).clamp(max=count), count], 1)
        starts = torch.nn.functional.pad(ends[:, :-1], (1, 0))
        members = ends - starts
        sums = prefix.gather(1, ends) - prefix.gather(1, starts)
        levels = torch.where(members > 0, sums / members.clamp(min=1), levels).float().sort(-1).values
    return levels


class KVQuant(Quantizer):
    """Every token on 2**bits non-uniform levels fitted to the data, the largest 1% kept apart in float16.

    Keys are normalized per channel, values per token, then each mapped to the nearest of 2**bits levels fitted to the page (k-means); the `outliers` fraction of
    largest-magnitude entries is kept apart in float16 (dense-and-sparse); the `residual` recent tokens stay
    in full precision.

    Deliberate differences from the paper: its levels (nuqX) and outlier thresholds are calibrated offline
    per layer with Fisher-information weighting; here both come from the page being stored (no calibration
    set needed). Keys are quantized after RoPE (the paper quantizes them before it). Defaults: 1% outliers
    (the paper's setting), groups of 32 tokens, 128 recent tokens in full precision.
    """

    name = "kvquant"

    def __init__(self, bits: int = 4, group: int = 32, residual: int = 128, outliers: float = 0.01):
        super().__init__(bits, group, residual)
        if not 0 <= outliers < 1:
            raise ValueError(f"outliers is a fraction in [0, 1); got {outliers}")
        self.outliers = outliers

    def _encode(self, pages, valid, normalize_dim):
        dense, sparse = split_outliers(pages, valid, self.outliers)
        lo, hi = masked_range(dense, valid, normalize_dim)
        lo, span = lo.half(), (hi - lo).half()
        unit = (dense - lo.float()) / span.float().clamp(min=torch.finfo(torch.float16).tiny)
        levels = fit_levels(unit, valid, 2 ** self.bits).half()
        codes = nearest_level(unit.flatten(1), levels.float()).view(unit.shape)
        return {"codes": pack_bits(codes, self.bits), "levels": levels, "zero": lo, "span": span} | sparse

    def encode_keys(self, pages, valid):
        return self._encode(pages, valid, normalize_dim=1)

    def encode_values(self, pages, valid):
        return self._encode(pages, valid, normalize_dim=-1)

    def decode(self, tensors, role, page_size, dim):
        codes = unpack_bits(tensors["codes"], self.bits, dim).long()
        levels = tensors["levels"].float()
        unit = levels.gather(1, codes.flatten(1)).view(codes.shape)
        return add_outliers(unit * tensors["span"].float() + tensors["zero"].float(), tensors)

    def describe(self):
        return super().describe() | {"outliers": self.outliers}
