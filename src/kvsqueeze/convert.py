"""SqueezeCaches from what transformers gives: its dynamic, sliding-window and quantized caches."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, QuantizedCache
from transformers.cache_utils import BaseQuantizedLayer, Cache, DynamicLayer, DynamicSlidingWindowLayer

from .cache import EvictingLayer, SlidingWindowLayer, SqueezeCache
from .quantizers import KIVI


def quantizer_like(layer: BaseQuantizedLayer):
    """kvsqueeze's quantizer for what a transformers quantized layer (quanto, HQQ backends) stores: the same bits
    and full-precision residual window, KIVI's layout (keys per channel, values per token)."""
    return KIVI(bits=layer.nbits, residual=layer.residual_length)


def quantized_contents(layer: BaseQuantizedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values a transformers quantized layer holds, decoded by its own backend, then its residual ones."""
    if layer._quantized_keys is None:
        return layer.keys, layer.values
    keys, values = layer._dequantize(layer._quantized_keys), layer._dequantize(layer._quantized_values)
    if hasattr(layer, "_apply_pending_reorder"):
        keys, values = layer._apply_pending_reorder(keys, values)
    if layer.keys is not None and layer.keys.dim() == 4:
        keys, values = torch.cat([keys, layer.keys], dim=-2), torch.cat([values, layer.values], dim=-2)
    return keys, values


def as_squeeze_cache(past) -> SqueezeCache:
    """A SqueezeCache with the tokens of `past`: a transformers Cache or a list of (keys, values) per layer.

    Dense tensors are shared, not copied. The layers of a transformers quantized cache (quanto, HQQ) are
    decoded by their backend and get kvsqueeze's matching quantizer (`quantizer_like`): a method evicts
    from the decoded tokens and the layer stores what it keeps quantized again (`SqueezeCache.quantize`
    stores the others).
    """
    if isinstance(past, SqueezeCache):
        return past.fork()
    layers = []
    for source in (past.layers if isinstance(past, Cache) else past):
        if isinstance(source, BaseQuantizedLayer):
            keys, values = quantized_contents(source)
            layer = EvictingLayer(quantizer=quantizer_like(source))
            if keys is not None and keys.numel():
                layer.update(keys, values)
        elif isinstance(source, DynamicSlidingWindowLayer):
            layer = SlidingWindowLayer(sliding_window=source.sliding_window)
            layer.__dict__.update(source.__dict__)
        elif isinstance(source, DynamicLayer) or isinstance(source, (tuple, list)):
            keys, values = (source.keys, source.values) if isinstance(source, DynamicLayer) else source
            layer = EvictingLayer()
            if keys is not None and keys.numel():
                layer.update(keys, values)
        else:
            raise TypeError(f"kvsqueeze cannot compress a cache layer of type {type(source).__name__}")
        layers.append(layer)
    return SqueezeCache(layers=layers)


def quantized_squeeze_cache(model: nn.Module, cache: QuantizedCache) -> SqueezeCache:
    """The SqueezeCache that takes over a transformers quantized cache: its tokens, stored at its bits."""
    if cache.get_seq_length():
        return as_squeeze_cache(cache)  # quantized again layer by layer, after each attends
    quantized = next(layer for layer in cache.layers if isinstance(layer, BaseQuantizedLayer))
    return SqueezeCache(model.config, quantizer=quantizer_like(quantized))


def squeeze_cache_for(model: nn.Module, cache):
    """The cache a forward under a method runs on, for the one it was given: the SqueezeCache itself, a new one for
    none or an empty default cache, one taking over a transformers quantized cache (its tokens, at its bits)."""
    if isinstance(cache, SqueezeCache):
        return cache
    if cache is None or (isinstance(cache, DynamicCache) and cache.get_seq_length() == 0):
        return SqueezeCache(model.config)
    if isinstance(cache, QuantizedCache):
        return quantized_squeeze_cache(model, cache)
    raise TypeError(f"kvsqueeze methods compress a SqueezeCache; got a filled {type(cache).__name__}")
