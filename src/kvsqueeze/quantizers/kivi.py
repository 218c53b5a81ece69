"""KIVI (Liu et al. 2024, arXiv:2402.02750): keys per channel, values per token, in 2 or 4 bits."""

from .base import (Quantizer, dequantize_uniform, pack_bits, quantize_uniform, uniform_logits, uniform_mix,
                   unpack_bits)


class KIVI(Quantizer):
    """Every token in 2 or 4 bits: keys per channel over groups of tokens, values per token; recent ones exact.

    Keys are quantized per channel over groups of `group` tokens (key outliers sit in a few channels),
    values per token over groups of `channel_group` channels; the `residual` most recent tokens stay in
    full precision. Asymmetric round-to-nearest, float16 scales and minima.

    Defaults are the paper's: group 32, residual 128 (its Table 5 uses G=32, R=128).

    Attention reads the codes without decoding them, as the paper's fused kernels do: a key channel's scale
    multiplies the query and its minimum adds a constant to the logits; a value's per-token scale multiplies
    the attention weight and its minimum adds the weighted sum of minima. So decoding over a quantized cache
    converts each code to a float once per step and multiplies it once, as a float cache multiplies its numbers.
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

    def decode(self, tensors, role, page_size, dim):
        codes = unpack_bits(tensors["codes"], self.bits, dim)
        if role == "keys":
            return dequantize_uniform(codes, tensors["scale"], tensors["zero"])
        n = codes.shape[0]
        group = self._channel_group(dim)
        grouped = dequantize_uniform(codes.view(n, page_size, dim // group, group), tensors["scale"], tensors["zero"])
        return grouped.view(n, page_size, dim)

    def logits(self, tensors, queries, page_size, dim):
        if dim % (8 // self.bits):
            return super().logits(tensors, queries, page_size, dim)
        return uniform_logits(tensors["codes"], tensors["scale"], tensors["zero"], self.bits, queries)

    def mix(self, tensors, weights, page_size, dim):
        if self._channel_group(dim) % (8 // self.bits):
            return super().mix(tensors, weights, page_size, dim)
        return uniform_mix(tensors["codes"], tensors["scale"][..., 0], tensors["zero"][..., 0], self.bits, weights)

    def _channel_group(self, dim: int) -> int:
        return self.channel_group if dim % self.channel_group == 0 else dim

    def describe(self):
        return super().describe() | {"channel_group": self.channel_group}
