"""KVQuant-style quantization (Hooper et al. 2024, arXiv:2401.18079): non-uniform levels, dense-and-sparse."""

import torch

from .base import Quantizer, add_outliers, masked_range, pack_bits, split_outliers, unpack_bits


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """The points halfway between consecutive sorted `levels` [n, L]: [n, L - 1]."""
    return (levels[:, 1:] + levels[:, :-1]) / 2


def nonuniform_codes(unit: torch.Tensor, valid: torch.Tensor, n_levels: int, outliers: torch.Tensor | None = None,
                     steps: int = 1024, iterations: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page, `n_levels` sorted levels [n, n_levels] fitted by 1-D k-means (Lloyd) to the `valid` values of
    `unit` [n, ...] (normalized to [0, 1]) that are not at `outliers` (flat positions in each page, [n, k]), and the
    code of every value (uint8, its level's index, unit's shape).

    The values are first placed on a grid of `steps` steps over [0, 1], each at its step's centre (at most half a
    step, 1/2048 of the page's range, away): Lloyd runs on each page's histogram, whose prefix counts give every
    level's members and their mean without sorting the values, and each step goes to its nearest level. Starts
    from the quantiles, so the levels follow the distribution; stops early where the levels no longer move.
    """
    n, device = unit.shape[0], unit.device
    # each value's step, the left out (not valid, or outliers) at -1, then counted page by page: step s of page i in
    # bin i * (steps + 1) + s + 1 (bin 0 of each page holds the left out, dropped); int32 where that fits (an int64
    # copy of every value cost more than the counting)
    index = torch.int32 if n * (steps + 1) < 2 ** 31 else torch.long
    step = (unit.reshape(n, -1) * steps).clamp_(0, steps - 1).to(index)
    if not bool(valid.all()):
        step.view(unit.shape).masked_fill_(~valid, -1)
    if outliers is not None:
        step.scatter_(1, outliers, -1)
    step = step.add_(torch.arange(1, n * (steps + 1), steps + 1, dtype=index, device=device)[:, None]).flatten()
    counts = torch.bincount(step, minlength=n * (steps + 1)).view(n, steps + 1)
    counts[:, 0] = 0
    # prefix sums [n, steps + 1], in place: how many values lie on the steps below each, and twice their sum in steps
    twice_sum = (counts * torch.arange(-1, 2 * steps, 2, device=device)).cumsum_(-1)  # bin b: centre (2b - 1) / 2
    below = counts.cumsum_(-1)
    total = below[:, -1:]
    rank = torch.linspace(0, 1, n_levels, device=device, dtype=torch.double)[None, :] * (total.clamp(min=1) - 1)
    levels = (torch.searchsorted(below, rank.round().long(), right=True) - 0.5) / steps  # below[:, 0] = 0: one more
    levels = levels.masked_fill(total == 0, 0)

    def boundaries(levels):  # how many steps have their centre at or below each midpoint (levels are >= 0)
        return (midpoints(levels) * steps + 0.5).long().clamp_(0, steps)

    edges = torch.zeros(n, n_levels + 1, dtype=torch.long, device=device)
    edges[:, -1] = steps
    for _ in range(iterations):
        edges[:, 1:-1] = boundaries(levels)
        members, twice = below.gather(1, edges).diff(dim=-1), twice_sum.gather(1, edges).diff(dim=-1)
        mean = twice / (2 * steps * members.clamp(min=1))
        fitted = torch.where(members > 0, mean, levels).float().sort(-1).values
        if torch.equal(fitted, levels):  # a fixed point: further iterations change nothing
            break
        levels = fitted
    # each bin's level: how many boundaries lie at or below its step
    level_of_bin = torch.zeros(n, steps + 2, dtype=torch.uint8, device=device).scatter_add_(
        1, boundaries(levels) + 1, torch.ones(n, n_levels - 1, dtype=torch.uint8, device=device))[:, :steps + 1]
    return levels, level_of_bin.cumsum(-1, dtype=torch.uint8).flatten().index_select(0, step).view(unit.shape)


class KVQuant(Quantizer):
    """Every token on 2**bits non-uniform levels fitted to the data, the largest 1% kept apart in float16.

    The `outliers` fraction of largest-magnitude entries is kept apart in float16 (dense-and-sparse); over the
    others, keys are normalized per channel and values per token, then each mapped to the nearest of 2**bits
    levels fitted to the page (k-means on a 1024-step histogram of its values, see `nonuniform_codes`); the
    `residual` recent tokens stay in full precision.

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
        outliers, sparse = split_outliers(pages, valid, self.outliers)
        lo, hi = masked_range(pages, valid, normalize_dim, outliers)
        lo, span = lo.half(), (hi - lo).half()
        unit = (pages - lo.float()).div_(span.float().clamp(min=torch.finfo(torch.float16).tiny))
        levels, codes = nonuniform_codes(unit, valid, 2 ** self.bits, outliers)
        return {"codes": pack_bits(codes, self.bits), "levels": levels.half(), "zero": lo, "span": span} | sparse

    def encode_keys(self, pages, valid):
        return self._encode(pages, valid, normalize_dim=1)

    def encode_values(self, pages, valid):
        return self._encode(pages, valid, normalize_dim=-1)

    def decode_into(self, tensors, role, out):
        lead, (page_size, dim) = out.shape[:-2], out.shape[-2:]
        codes = unpack_bits(tensors["codes"], self.bits, dim).long()
        unit = tensors["levels"].float().gather(1, codes.flatten(1)).view(*lead, page_size, dim)
        span, zero = (tensors[name].view(*lead, *tensors[name].shape[1:]).float() for name in ("span", "zero"))
        return add_outliers(torch.addcmul(zero, unit, span, out=out), tensors)

    def describe(self):
        return super().describe() | {"outliers": self.outliers}
