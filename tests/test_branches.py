"""One prefill for several methods gives exactly the caches each method makes alone."""

import pytest
import torch
from conftest import RATIO_METHODS, build_method, random_ids, tiny_model

import kvsqueeze
from kvsqueeze import compress_each
from kvsqueeze.cache import EvictingLayer
from kvsqueeze.ragged import RaggedLayer


def held(layer):
    """What a layer holds, comparable across layer kinds."""
    if isinstance(layer, RaggedLayer):
        keys, values, real = layer.dense_view()
        return keys[real], values[real]
    if isinstance(layer, EvictingLayer):
        return layer.keys, layer.values
    return layer.keys, layer.values


def assert_same_cache(a, b):
    assert len(a.layers) == len(b.layers)
    for left, right in zip(a.layers, b.layers):
        assert type(left) is type(right)
        for x, y in zip(held(left), held(right)):
            assert torch.equal(x, y)
    assert a.nbytes() == b.nbytes() and a.peak_bytes() == b.peak_bytes()


def shareable(model):
    methods = [build_method(name, 0.5, model) for name in RATIO_METHODS]
    return [m for m in methods if not m.has("changes_prefill") and m.phase != "decode"]


def test_one_prefill_gives_each_method_its_own_cache(family):
    model = tiny_model(family, attn="eager")  # observed_attention reads the attention weights
    ids = random_ids(96)
    methods = [None] + shareable(model)
    together = compress_each(model, None, ids, methods)
    question = random_ids(4, seed=1)
    for method, ctx in zip(methods, together):
        alone = kvsqueeze.compress(model, None, ids, method)
        assert_same_cache(alone.cache, ctx.cache)
        assert ctx.stats.kept_per_layer_head == alone.stats.kept_per_layer_head
        assert torch.equal(ctx.generate(question, max_new_tokens=4), alone.generate(question, max_new_tokens=4))


def test_quantizers_and_batches_of_different_lengths():
    model = tiny_model("qwen3")
    rows = [random_ids(80), random_ids(57, seed=2)]
    methods = [None, kvsqueeze.SnapKV(ratio=0.5), kvsqueeze.AdaKV(ratio=0.5, scorer="knorm"), kvsqueeze.StreamingLLM(ratio=0.25)]
    quantizers = [None, "kivi-4", None, "kvquant-2"]
    for method, quant, ctx in zip(methods, quantizers, compress_each(model, None, rows, methods, quantizers=quantizers)):
        alone = kvsqueeze.compress(model, None, rows, method, quantizer=quant)
        assert_same_cache(alone.cache, ctx.cache)
        assert ctx.stats.quantizer == alone.stats.quantizer


class Widening(kvsqueeze.KNorm):
    name = ""
    declares = frozenset({"changes_prefill"})


def test_a_method_that_changes_the_prefill_cannot_share_it():
    model = tiny_model()
    with pytest.raises(ValueError, match="prefill of its own"):
        compress_each(model, None, random_ids(20), [None, Widening(ratio=0.5)])


class Failing(kvsqueeze.KNorm):
    """Raises on the third layer it compresses."""

    name = ""

    def compress(self, ctx):
        if ctx.layer_idx == 2:
            raise RuntimeError("cannot act on this layer")
        super().compress(ctx)


def test_a_method_that_raises_stops_alone_when_asked_and_everything_otherwise():
    model = tiny_model()
    ids = random_ids(64)
    methods = [None, Failing(ratio=0.5), kvsqueeze.SnapKV(ratio=0.5)]
    with pytest.raises(RuntimeError, match="this layer"):
        compress_each(model, None, ids, methods)
    full, failure, snapkv = compress_each(model, None, ids, methods, errors="return")
    assert isinstance(failure, RuntimeError)
    assert_same_cache(full.cache, kvsqueeze.compress(model, None, ids).cache)
    assert_same_cache(snapkv.cache, kvsqueeze.compress(model, None, ids, kvsqueeze.SnapKV(ratio=0.5)).cache)
    with pytest.raises(ValueError, match="errors="):
        compress_each(model, None, ids, methods, errors="ignore")
