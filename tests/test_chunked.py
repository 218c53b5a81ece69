"""Chunked prefill: the context goes in chunks and the cache is compressed after each one."""

import pytest
import torch

import kvsqueeze
from kvsqueeze.layout import chunks
from conftest import forward_cache, random_ids, tiny_model


def test_chunks_never_leave_a_single_token_forward():
    assert chunks(10, None) == [slice(0, 10)]
    assert chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert chunks(9, 4) == [slice(0, 4), slice(4, 9)]
    with pytest.raises(ValueError):
        chunks(10, 1)


@pytest.mark.parametrize("name", ["knorm", "snapkv", "adakv", "expected_attention", "streaming_llm", "pyramidkv"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_cache_never_holds_more_than_the_budget_plus_one_chunk(name, family):
    model = tiny_model(family)
    held_after_chunk = []

    def record(module, args, kwargs, output):
        cache = forward_cache(kwargs)
        held_after_chunk.append((cache.get_seq_length(), max(int(layer.kept_per_head().max())
                                                             for layer in cache.layers
                                                             if not isinstance(layer, kvsqueeze.SlidingWindowLayer))))

    handle = model.base_model.register_forward_hook(record, with_kwargs=True)
    try:
        ctx = kvsqueeze.compress(model, None, random_ids(300), kvsqueeze.method(name, ratio=0.75), chunk_size=64)
    finally:
        handle.remove()
    assert [seen for seen, _ in held_after_chunk] == [64, 128, 192, 256, 300]
    for seen, held in held_after_chunk:
        # after each chunk every head holds at most a quarter of what was seen (the pyramid's first layer and
        # AdaKV's busiest head up to twice that); before compressing, that plus one chunk
        limit = seen // 4 * (2 if name in ("pyramidkv", "adakv") else 1)
        assert held <= limit + 1
    assert ctx.stats.compression_ratio == pytest.approx(0.75, abs=0.01)
    assert ctx.generate(random_ids(4, seed=1), max_new_tokens=3).shape == (1, 3)


def test_chunked_prefill_without_compression_reproduces_the_model():
    model = tiny_model("qwen3")
    context, question = random_ids(200), random_ids(5, seed=2)
    whole = kvsqueeze.compress(model, None, context)
    chunked = kvsqueeze.compress(model, None, context, chunk_size=48)
    for a, b in zip(whole.cache.layers, chunked.cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert torch.equal(whole.generate(question, max_new_tokens=5), chunked.generate(question, max_new_tokens=5))


def test_methods_that_need_the_whole_context_refuse_chunks():
    with pytest.raises(ValueError, match="ThinK decides once from the whole context"):
        kvsqueeze.compress(tiny_model(), None, random_ids(100), kvsqueeze.ThinK(), chunk_size=32)


def test_contexts_beyond_the_window_only_on_request():
    model = tiny_model()
    with pytest.raises(kvsqueeze.ContextTooLongError):
        kvsqueeze.compress(model, None, random_ids(600), kvsqueeze.KNorm(ratio=0.75), chunk_size=128)
    ctx = kvsqueeze.compress(model, None, random_ids(600), kvsqueeze.KNorm(ratio=0.75), chunk_size=128,
                             check_window=False)
    assert ctx.cache.get_seq_length() == 600 and ctx.cache.layers[0].stored == 150
