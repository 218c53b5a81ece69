"""GEAR (Kang et al. 2024, arXiv:2403.05527): low-bit quantization + low-rank error + sparse outliers."""

import torch

from .base import Quantizer, add_outliers, dequantize_uniform, pack_bits, quantize_uniform, split_outliers, unpack_bits


class GEAR(Quantizer):
    """Every token in a few bits, plus a low-rank approximation of the error and sparse float16 outliers.

    Two corrections recover most of the quantization error: the `outliers` fraction of largest entries kept
    in float16 (sparse), and a rank-`rank` approximation of what quantization left (float16 factors); the
    `residual` recent tokens stay in full precision.

    As in the paper's KIVI-backbone variant, keys are quantized per channel and values per token; like its
    streaming buffer, tokens are compressed a group (page) of `group` tokens at a time, and the low-rank
    factors are per group. Defaults follow the paper: 4 bits, 2% outliers, and rank 2 (its ρ = 2% of a
    64-token group, rounded up).
    """

    name = "gear"

    def __init__(self, bits: int = 4, group: int = 64, residual: int = 128, rank: int = 2, outliers: float = 0.02):
        super().__init__(bits, group, residual)
        if rank < 0 or not 0 <= outliers < 1:
            raise ValueError(f"GEAR needs rank >= 0 and outliers in [0, 1); got {rank}, {outliers}")
        self.rank, self.outliers = rank, outliers

    def _encode(self, pages, valid, dim):
        dense, sparse = split_outliers(pages, valid, self.outliers)
        parts = quantize_uniform(dense, valid, self.bits, dim)
        error = (dense - dequantize_uniform(parts["codes"], parts["scale"], parts["zero"])) * valid
        left, singular, right = torch.linalg.svd(error, full_matrices=False)
        rank = min(self.rank, singular.shape[-1])
        factors = {"left": (left[..., :rank] * singular[:, None, :rank]).half(), "right": right[:, :rank].half()}
        return {"codes": pack_bits(parts["codes"], self.bits), "scale": parts["scale"], "zero": parts["zero"]
                } | factors | sparse

    def encode_keys(self, pages, valid):
        return self._encode(pages, valid, dim=1)

    def encode_values(self, pages, valid):
        return self._encode(pages, valid, dim=-1)

    def decode(self, tensors, role, page_size, dim):
        codes = unpack_bits(tensors["codes"], self.bits, dim)
        pages = dequantize_uniform(codes, tensors["scale"], tensors["zero"])
        pages = pages + tensors["left"].float() @ tensors["right"].float()
        return add_outliers(pages, tensors)

    def describe(self):
        return super().describe() | {"rank": self.rank, "outliers": self.outliers}
