"""GEAR (Kang et al. 2024, arXiv:2403.05527): low-bit quantization + low-rank error + sparse outliers."""

import torch

from .base import Quantizer, add_outliers, dequantize_uniform, pack_bits, quantize_uniform, split_outliers


def low_rank(error: torch.Tensor, rank: int, iterations: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors left [n, page, rank] and right [n, rank, dim] with left @ right close to the best rank-`rank`
    approximation of each `error` [n, page, dim], by power iteration as the paper computes them (its SVDSolver):
    from a fixed start, an orthonormal basis of what the error makes of it, then the error seen in that basis."""
    n, page, dim = error.shape
    if rank == 0:
        return error.new_zeros(n, page, 0), error.new_zeros(n, 0, dim)
    # the products are written so that the error is the contiguous operand: `linear` against one shared start,
    # then left^T @ error (a rank-wide `@` on either side of a transposed error took 5x as long on a CPU)
    start = torch.randn(dim, rank, generator=torch.Generator().manual_seed(0)).to(error.device).T
    left = torch.linalg.qr(torch.nn.functional.linear(error, start)).Q  # orthonormal: the error's main directions
    right = left.transpose(1, 2) @ error
    for _ in range(iterations - 1):
        left = torch.linalg.qr(error @ right.transpose(1, 2)).Q
        right = left.transpose(1, 2) @ error
    return left, right


class GEAR(Quantizer):
    """Every token in a few bits, plus a low-rank approximation of the error and sparse float16 outliers.

    Two corrections recover most of the quantization error: the `outliers` fraction of largest entries kept
    in float16 (sparse), and a rank-`rank` approximation of what quantization left (float16 factors); the
    `residual` recent tokens stay in full precision.

    As in the paper's KIVI-backbone variant, keys are quantized per channel and values per token; like its
    streaming buffer, tokens are compressed a group (page) of `group` tokens at a time, and the low-rank
    factors are per group, found by power iteration as the paper's do (two steps from a fixed start; a full SVD
    of every group cost GEAR-4 as much as the prefill itself). Defaults follow the paper: 4 bits, 2% outliers, and
    rank 2 (its ρ = 2% of a 64-token group, rounded up).

    Attention decodes a layer's pages each step: codes in place (as KIVI's), plus the low-rank part, then the
    outliers written over their entries.
    """

    name = "gear"

    def __init__(self, bits: int = 4, group: int = 64, residual: int = 128, rank: int = 2, outliers: float = 0.02):
        super().__init__(bits, group, residual)
        if rank < 0 or not 0 <= outliers < 1:
            raise ValueError(f"GEAR needs rank >= 0 and outliers in [0, 1); got {rank}, {outliers}")
        self.rank, self.outliers = rank, outliers

    def _encode(self, pages, valid, dim):
        outliers, sparse = split_outliers(pages, valid, self.outliers)
        parts = quantize_uniform(pages, valid, self.bits, dim, outliers)
        stored = parts["codes"].float().mul_(parts["scale"].float()).add_(parts["zero"].float())
        error = torch.sub(pages, stored, out=stored)
        if not bool(valid.all()):
            error.masked_fill_(~valid, 0)
        if outliers is not None:  # stored apart: no error to correct there
            error.view(len(error), -1).scatter_(1, outliers, 0)
        left, right = low_rank(error, min(self.rank, *error.shape[1:]))
        factors = {"left": left.half(), "right": right.half()}
        return {"codes": pack_bits(parts["codes"], self.bits), "scale": parts["scale"], "zero": parts["zero"]
                } | factors | sparse

    def encode_keys(self, pages, valid):
        return self._encode(pages, valid, dim=1)

    def encode_values(self, pages, valid):
        return self._encode(pages, valid, dim=-1)

    def decode_into(self, tensors, role, out):
        dequantize_uniform(tensors["codes"], tensors["scale"], tensors["zero"], self.bits, out)
        lead = out.shape[:-2]
        left, right = (tensors[name].view(*lead, *tensors[name].shape[1:]) for name in ("left", "right"))
        for r in range(left.shape[-1]):  # each rank-one part added in place (a product then a sum: 1.35x as long)
            out.addcmul_(left[..., r:r + 1], right[..., r:r + 1, :])
        return add_outliers(out, tensors)

    def describe(self):
        return super().describe() | {"rank": self.rank, "outliers": self.outliers}
