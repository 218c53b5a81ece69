"""KIVI (Liu et al. 2024, arXiv:2402.02750): keys per channel, values per token, in 2 or 4 bits."""

import torch

from .base import Quantizer, code_planes, dequantize_uniform, pack_bits, quantize_uniform, unpack_bits


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
        per_byte = 8 // self.bits
        if dim % per_byte:
            return super().logits(tensors, queries, page_size, dim)
        queries = queries.float()
        scaled = queries * tensors["scale"].float()  # [n, rows, dim]: each channel's scale folded into the query
        scaled = scaled.unflatten(-1, (-1, per_byte)).permute(3, 0, 1, 2).contiguous()  # by plane, as the codes
        planes = code_planes(tensors["codes"], self.bits)  # plane i: channels i, i + per_byte, ...
        out = sum(torch.bmm(part, plane.float().transpose(1, 2)) for part, plane in zip(scaled, planes))
        return out + (queries * tensors["zero"].float()).sum(-1, keepdim=True)  # each channel's minimum: a constant

    def mix(self, tensors, weights, page_size, dim):
        per_byte, group = 8 // self.bits, self._channel_group(dim)
        if group % per_byte:
            return super().mix(tensors, weights, page_size, dim)
        n, rows, groups = weights.shape[0], weights.shape[1], dim // group
        weights = weights.float()
        scale, zero = tensors["scale"].float()[..., 0], tensors["zero"].float()[..., 0]  # [n, page_size, groups]
        # per channel group, the weights times each token's scale: [n * groups, rows, page_size]
        scaled = (weights[..., None] * scale[:, None]).permute(0, 3, 1, 2).reshape(n * groups, rows, page_size)
        codes = tensors["codes"].view(n, page_size, groups, -1).transpose(1, 2).reshape(n * groups, page_size, -1)
        planes = [torch.bmm(scaled, plane.float()) for plane in code_planes(codes, self.bits)]
        out = torch.stack(planes, -1).view(n, groups, rows, group).transpose(1, 2)  # channel k * per_byte + plane
        return (out + torch.bmm(weights, zero)[..., None]).reshape(n, rows, dim)

    def _channel_group(self, dim: int) -> int:
        return self.channel_group if dim % self.channel_group == 0 else dim

    def describe(self):
        return super().describe() | {"channel_group": self.channel_group}
