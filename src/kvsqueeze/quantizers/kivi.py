"""KIVI (Liu et al. 2024, arXiv:2402.02750): keys per channel, values per token, in 2 or 4 bits."""

from .base import Quantizer, dequantize_uniform, pack_bits, quantize_uniform


class KIVI(Quantizer):
    """Every token in 2 or 4 bits: keys per channel over groups of tokens, values per token; recent ones exact.

    Keys are quantized per channel over groups of `group` tokens (key outliers sit in a few channels),
    values per token over groups of `channel_group` channels; the `residual` most recent tokens stay in
    full precision. Asymmetric round-to-nearest, float16 scales and minima.

    Defaults are the paper's: group 32, residual 128 (its Table 5 uses G=32, R=128).

    Each step, attention decodes a layer's pages straight into the keys and values it reads (`decode_into`):
    the paper's fused kernels read the codes without writing them out, which PyTorch alone cannot do.
    """

    name = "kivi"

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128, channel_group: int = 32):
        super().__init__(bits, group, residual)
        self.channel_group = channel_group

    def encode_keys(self, pages, valid):
        parts = quantize_uniform(pages, valid, self.bits, dim=1)  # one scale per (page, channel)
        return parts | {"codes": pack_bits(parts["codes"], self.bits)}

    def encode_values(self, pages, valid):
        n, page, dim = pages.shape
        group = self._channel_group(dim)
        grouped = pages.view(n, page, dim // group, group)
        parts = quantize_uniform(grouped, valid[..., None], self.bits, dim=-1)  # one scale per (token, channel group)
        return parts | {"codes": pack_bits(parts["codes"].view(n, page, dim), self.bits)}

    def decode_into(self, tensors, role, out):
        return dequantize_uniform(tensors["codes"], tensors["scale"], tensors["zero"], self.bits, out)

    def _channel_group(self, dim: int) -> int:
        return self.channel_group if dim % self.channel_group == 0 else dim

    def describe(self):
        return super().describe() | {"channel_group": self.channel_group}
