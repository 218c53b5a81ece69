"""What a quantizer is: a way to store a cache layer's pages of kept tokens in a few bits.

A quantizer encodes pages [n_pages, page_size, dim] of keys or of values into a few named tensors whose
first dimension is the page (packed codes, scales, outliers...), and decodes them back. Pages are the
quantization groups: `group` tokens each. The layer keeps its `residual` most recent tokens in full
precision and folds older ones into new quantized pages as it grows (see `ragged.RaggedLayer`).
Bytes held are the bytes of those tensors: nothing is stored at full precision behind the scenes.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

REGISTRY: dict[str, type["Quantizer"]] = {}


class Quantizer:
    """Base of all quantizers. Subclasses set `name` and implement `encode_keys` / `encode_values` / `decode`."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, bits: int, group: int, residual: int):
        if bits not in (1, 2, 4, 8):
            raise ValueError(f"{type(self).__name__} packs 1, 2, 4 or 8 bits per number; got {bits}")
        if group < 1 or residual < 0:
            raise ValueError("the group must hold at least one token and the residual window cannot be negative")
        self.bits, self.group, self.residual = bits, group, residual

    def recent_run(self, mask: torch.Tensor) -> int:
        """How many of the most recent positions every (batch row, head) of `mask` [..., n] keeps, up to the
        residual window: those stay in full precision."""
        if not self.residual or mask.shape[-1] == 0:
            return 0
        common = mask.reshape(-1, mask.shape[-1]).all(0)
        return int(common.flip(0)[: self.residual].long().cumprod(0).sum())

    def encode(self, pages: torch.Tensor, fill: torch.Tensor, role: str) -> "QuantizedPages":
        """Encode pages [n, page_size, dim] whose first `fill` [n] slots hold tokens (the rest is ignored)."""
        if len(pages) == 0:  # the named tensors of no page: those of one, sliced away
            return self.encode(pages.new_zeros(1, *pages.shape[1:]), fill.new_zeros(1), role)[:0]
        valid = (torch.arange(pages.shape[1], device=pages.device)[None, :] < fill[:, None])[..., None]
        encode = self.encode_keys if role == "keys" else self.encode_values
        return QuantizedPages(self, role, encode(pages.float(), valid), pages.shape[1:], pages.dtype)

    def encode_keys(self, pages: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_values(self, pages: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode(self, tensors: dict[str, torch.Tensor], role: str, page_size: int, dim: int) -> torch.Tensor:
        """Pages [n, page_size, dim] in float32. A quantizer implements this or `decode_into`."""
        first = next(iter(tensors.values()))
        return self.decode_into(tensors, role, torch.empty(len(first), page_size, dim, device=first.device))

    def decode_into(self, tensors: dict[str, torch.Tensor], role: str, out: torch.Tensor) -> torch.Tensor:
        """Decode into `out` [..., page_size, dim], in its dtype; its leading dimensions hold the pages, in order (a
        view into a larger buffer will do: attention decodes a layer's pages into its keys and values this way
        every step). By default, decodes and copies; a quantizer that can write its numbers in place implements this
        instead of `decode`."""
        return out.copy_(self.decode(tensors, role, *out.shape[-2:]).view(out.shape))

    def describe(self) -> dict:
        return {"bits": self.bits, "group": self.group, "residual": self.residual}

    def spec(self) -> dict:
        """What rebuilds this quantizer: its name and settings."""
        return {"name": self.name} | self.describe()

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.describe().items())})"


class QuantizedPages:
    """Pages stored by a quantizer: named tensors, each with the page as first dimension; `dequantize()` decodes."""

    def __init__(self, quantizer: Quantizer, role: str, tensors: dict[str, torch.Tensor], page_shape, dtype):
        self.quantizer, self.role, self.tensors = quantizer, role, tensors
        self.page_size, self.dim = int(page_shape[0]), int(page_shape[1])
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self), self.page_size, self.dim)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dequantize(self) -> torch.Tensor:
        if len(self) == 0:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.quantizer.decode(self.tensors, self.role, self.page_size, self.dim).to(self.dtype)

    def decode_into(self, out: torch.Tensor) -> torch.Tensor:
        """Decode into `out` [..., page_size, dim], whose leading dimensions hold these pages in order."""
        return self.quantizer.decode_into(self.tensors, self.role, out)

    def __getitem__(self, index) -> "QuantizedPages":
        tensors = {name: t[index] for name, t in self.tensors.items()}
        return QuantizedPages(self.quantizer, self.role, tensors, (self.page_size, self.dim), self.dtype)

    def cat(self, other: "QuantizedPages") -> "QuantizedPages":
        tensors = {name: torch.cat([t, other.tensors[name]]) for name, t in self.tensors.items()}
        return QuantizedPages(self.quantizer, self.role, tensors, (self.page_size, self.dim), self.dtype)


# -- building blocks the quantizers share --

def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (integers below 2**bits) packed along the last dimension, 8 // bits per byte (padded with zeros)."""
    per_byte = 8 // bits
    codes = codes.to(torch.uint8)
    pad = -codes.shape[-1] % per_byte
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    planes = codes.unflatten(-1, (-1, per_byte)).unbind(-1)  # plane i: the codes i, i + per_byte, ...
    packed = planes[0].clone()
    for i, plane in enumerate(planes[1:], 1):
        packed |= plane << (bits * i)
    return packed


def code_planes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """`pack_bits`' output split by position in the byte: plane i holds the codes i, i + 8 // bits, ... (uint8)."""
    mask, last = 2 ** bits - 1, 8 // bits - 1  # the first plane needs no shift, the last no mask
    if last == 0:
        return [packed]
    return [packed & mask] + [(packed >> (bits * i)) & mask for i in range(1, last)] + [packed >> (bits * last)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` codes of each row of `pack_bits`' output, as uint8."""
    return torch.stack(code_planes(packed, bits), -1).flatten(-2)[..., :n]


def masked_range(x: torch.Tensor, valid: torch.Tensor, dim, outliers: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x [n, ...] over `dim` among the `valid` entries, leaving out those at `outliers` (flat
    positions in each page, [n, k]; see `split_outliers`); (0, 0) where no entry is left."""
    full = bool(valid.all())
    if full and outliers is None:  # one pass, no masked copy
        return torch.aminmax(x, dim=dim, keepdim=True)

    def left_out_as(bound: float, y: torch.Tensor) -> torch.Tensor:  # y with the entries left out set to `bound`
        if not full:
            y.masked_fill_(~valid, bound)
        if outliers is not None:
            y.view(len(y), -1).scatter_(1, outliers, bound)
        return y

    bounded = left_out_as(math.inf, x.clone())  # one copy for both: first the min, then the max
    lo = bounded.amin(dim, keepdim=True)
    hi = left_out_as(-math.inf, bounded).amax(dim, keepdim=True)
    empty = torch.isinf(lo)
    return lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)


def quantize_uniform(x: torch.Tensor, valid: torch.Tensor, bits: int, dim, outliers: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
    """Asymmetric round-to-nearest on 2**bits levels between the min and the max over `dim` (the group) of the
    `valid` entries that are not `outliers` (see `masked_range`; those others get codes, clamped, that the
    decoding overwrites or ignores).

    Scale and minimum are kept in float16, as KIVI does; codes are unpacked uint8 (packing is the caller's).
    """
    lo, hi = masked_range(x, valid, dim, outliers)
    scale = ((hi - lo) / (2 ** bits - 1)).half()
    lo = lo.half()
    safe = scale.float().clamp(min=torch.finfo(torch.float16).tiny)
    codes = (x - lo.float()).div_(safe).round_().clamp_(0, 2 ** bits - 1)  # in place: one copy of the pages
    return {"codes": codes.to(torch.uint8), "scale": scale, "zero": lo}


def unpack_into(packed: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """`pack_bits`' codes [..., bytes] written into `out` [..., n] (any dtype): each plane of the bytes goes
    straight to its positions, with no unpacked uint8 copy in between."""
    per_byte = 8 // bits
    if out.shape[-1] % per_byte:
        return out.copy_(unpack_bits(packed, bits, out.shape[-1]))
    positions = out.unflatten(-1, (-1, per_byte))
    for i, plane in enumerate(code_planes(packed, bits)):
        positions[..., i] = plane
    return out


def dequantize_uniform(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       out: torch.Tensor) -> torch.Tensor:
    """`quantize_uniform`'s packed codes decoded into `out` [..., page, dim] (leading dimensions: the pages): each
    code times its scale plus its minimum, given per (page, channel) ([pages, 1, dim]), per token
    ([pages, page, 1]) or per (token, group of channels) ([pages, page, groups, 1])."""
    lead = out.shape[:-2]
    unpack_into(packed.view(*lead, *packed.shape[1:]), bits, out)
    scale, zero = (t.view(*lead, *t.shape[1:]).to(out.dtype) for t in (scale, zero))
    grouped = out.unflatten(-1, (scale.shape[-2], -1)) if scale.dim() > out.dim() else out
    grouped.mul_(scale).add_(zero)
    return out


def largest_magnitudes(x: torch.Tensor, count: int, block: int = 8) -> torch.Tensor:
    """Positions of the `count` entries largest in magnitude of each row of `x` [n, m] (in no particular order;
    among equal magnitudes at the boundary, any). The row is split into blocks of `block` entries (block j: the
    entries j, j + m / block, ...); the entries sought lie in the `count` blocks with the largest magnitudes (an
    entry outside them would have `count` blocks' at least as large above it), so only those are searched: half
    the time of a top-k over whole rows of a 64 x 64 page. Each block's magnitude is the larger of its maximum and
    its negated minimum, reduced across the blocks' entries side by side (no copy of the magnitudes)."""
    n, m = x.shape
    if m % block or count * block >= m:
        return x.abs().topk(count, dim=-1, sorted=False).indices
    width = m // block
    blocks = x.view(n, block, width)
    magnitude = torch.maximum(blocks.amax(1), blocks.amin(1).neg_())  # [n, width]
    chosen = magnitude.topk(count, dim=-1, sorted=False).indices  # [n, count]
    positions = (chosen[:, None, :] + torch.arange(0, m, width, device=x.device)[:, None]).flatten(1)
    return positions.gather(1, x.gather(1, positions).abs_().topk(count, dim=-1, sorted=False).indices)


def split_outliers(x: torch.Tensor, valid: torch.Tensor, fraction: float
                   ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Set the `fraction` of each page's `valid` entries of `x` [n, page, dim] largest in magnitude apart.

    Returns their flat positions in the page ([n, count], int64; None where the fraction is 0), which the dense
    part leaves out (they no longer stretch the ranges it is quantized over, and what it stores there is
    overwritten on decoding), and the sparse part: float16 values and those positions.
    """
    n, page, dim = x.shape
    count = max(1, math.ceil(fraction * page * dim)) if fraction > 0 else 0
    if count == 0:
        return None, {}
    held = x if bool(valid.all()) else x.masked_fill(~valid, 0)  # empty slots: chosen last
    position = largest_magnitudes(held.reshape(n, page * dim), count)
    values = x.reshape(n, page * dim).gather(-1, position)
    index_dtype = torch.int16 if page * dim <= 2 ** 15 else torch.int32
    return position, {"outlier_values": values.half(), "outlier_index": position.to(index_dtype)}


def add_outliers(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Write `split_outliers`' sparse part over pages `x` [..., page, dim] (in place; leading dimensions: the pages,
    each contiguous, as in a view of attention's buffer)."""
    if "outlier_values" not in tensors:
        return x
    lead = x.shape[:-2]
    position = tensors["outlier_index"].long().view(*lead, -1)
    x.view(*lead, -1).scatter_(-1, position, tensors["outlier_values"].view(*lead, -1).to(x.dtype))
    return x
