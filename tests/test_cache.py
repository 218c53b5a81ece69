"""The cache: logical vs physical length, real eviction, forks that never disturb the original."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsqueeze
from kvsqueeze.cache import EvictingLayer, SqueezeCache
from kvsqueeze.convert import as_squeeze_cache
from conftest import cached, output_cache, random_ids, tiny_model


def filled_layer(batch=1, heads=2, tokens=10, dim=4):
    layer = EvictingLayer()
    keys = torch.arange(batch * heads * tokens * dim, dtype=torch.float32).view(batch, heads, tokens, dim)
    layer.update(keys, -keys)
    return layer, keys


def test_lengths_and_mask_sizes_after_eviction():
    layer, keys = filled_layer()
    mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    mask[..., [0, 3, 9]] = True
    assert layer.keep(mask) is layer
    assert layer.get_seq_length() == 10 and layer.stored == 3
    # masks cover only the tokens that came after the compression (none yet) and the query: the three kept tokens
    # are always visible, whatever transformers' mask says
    assert layer.get_mask_sizes(4) == (4, 10) and layer.fresh == 0
    assert torch.equal(layer.keys, keys[:, :, [0, 3, 9]])
    assert torch.equal(layer.values, -keys[:, :, [0, 3, 9]])
    assert layer.nbytes() == 2 * 3 * 4 * 4 * 2 and layer.peak_bytes == 2 * 10 * 4 * 4 * 2


@settings(max_examples=50, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), tokens=st.integers(1, 40), data=st.data())
def test_keep_holds_exactly_the_chosen_tokens_in_order(batch, heads, tokens, data):
    k = data.draw(st.integers(1, tokens))
    layer, keys = filled_layer(batch, heads, tokens)
    scores = torch.rand(batch, heads, tokens, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    mask = kvsqueeze.budgets.top_k_mask(scores, k)
    layer.keep(mask)
    for b in range(batch):
        for h in range(heads):
            chosen = mask[b, h].nonzero().flatten()
            assert torch.equal(layer.keys[b, h], keys[b, h, chosen])
    assert layer.stored == k and layer.get_seq_length() == tokens
    assert layer.nbytes() == 2 * batch * heads * k * 4 * 4


def test_unequal_heads_make_the_layer_ragged():
    layer, keys = filled_layer()
    mask = torch.ones(1, 2, 10, dtype=torch.bool)
    mask[0, 0, :7] = False
    ragged = layer.keep(mask)
    assert isinstance(ragged, kvsqueeze.RaggedLayer) and ragged.kept_per_head().tolist() == [[3, 10]]
    assert ragged.get_seq_length() == 10 and ragged.peak_bytes == layer.peak_bytes
    dense_keys, _, real = ragged.dense_view()
    assert torch.equal(dense_keys[0, 0, :3], keys[0, 0, 7:]) and torch.equal(dense_keys[0, 1], keys[0, 1])
    assert real.sum().item() == 13


def test_fork_shares_memory_and_leaves_the_original_untouched():
    model = tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.KNorm(ratio=0.5))
    before = [(layer.keys, layer.values, layer.seen) for layer in ctx.cache.layers]
    fork = ctx.cache.fork()
    assert all(a.keys is b.keys for a, b in zip(fork.layers, ctx.cache.layers))
    with torch.no_grad(), kvsqueeze.attached(model):
        model(random_ids(5, seed=9), **cached(fork))
    assert fork.get_seq_length() == 45 and ctx.cache.get_seq_length() == 40
    for layer, (keys, values, seen) in zip(ctx.cache.layers, before):
        assert layer.keys is keys and layer.values is values and layer.seen == seen


def test_crop_removes_the_newest_tokens():
    layer, keys = filled_layer()
    layer.crop(-3)
    assert layer.stored == 7 and layer.get_seq_length() == 7
    with pytest.raises(ValueError):
        layer.crop(2)


def test_as_squeeze_cache_adopts_a_transformers_cache():
    model = tiny_model("gemma3")
    with torch.no_grad():
        out = model(random_ids(30), use_cache=True)
    cache = as_squeeze_cache(output_cache(out))
    assert isinstance(cache, SqueezeCache)
    assert [type(layer).__name__ for layer in cache.layers] == ["SlidingWindowLayer", "EvictingLayer"] * 2
    assert cache.get_seq_length() == 30 and cache.nbytes() > 0


def test_cache_for_a_model_with_unsupported_layers():
    config = tiny_model().config
    config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    with pytest.raises(ValueError, match="linear_attention"):
        SqueezeCache(config)


def test_decoded_tokens_are_written_in_place_and_forks_keep_what_they_saw():
    layer, keys = filled_layer()
    token = lambda value: torch.full((1, 2, 1, 4), float(value))
    layer.update(token(0), token(0))  # the first decoded token: copied once, with room after it
    where = layer.keys.data_ptr()
    first, second = layer.fork(), layer.fork()
    for step in range(1, 6):  # written after the shared tokens, in the same memory: no copy per step
        first.update(token(step), token(-step))
    assert first.keys.data_ptr() == where and first.stored == 16 and first.nbytes() == first.room.nbytes
    second.update(token(100), token(-100))  # the room after the shared tokens is taken: this fork copies
    assert second.keys.data_ptr() != where
    assert torch.equal(first.keys[:, :, 10:, 0], torch.arange(0, 6.0).expand(1, 2, 6))
    assert torch.equal(second.keys[:, :, 10:, 0], torch.tensor([0.0, 100.0]).expand(1, 2, 2))
    assert layer.stored == 11 and torch.equal(layer.keys[:, :, :10], keys) and layer.keys[..., 10, :].eq(0).all()
    assert torch.equal(first.keys[:, :, :10], keys) and torch.equal(second.values[:, :, :10], -keys)
    first.keep(torch.ones(1, 2, 16, dtype=torch.bool).index_fill_(-1, torch.tensor([3]), False))
    assert first.room is None and first.nbytes() == 2 * 15 * 4 * 4 * 2  # evicted: the room went with the old keys


def test_forks_decoding_in_threads_each_get_their_own_tokens():
    layer, keys = filled_layer()
    layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))  # room after the tokens every fork shares
    results = {}

    def decode(value):
        fork = layer.fork()
        for _ in range(50):
            fork.update(torch.full((1, 2, 1, 4), float(value)), torch.full((1, 2, 1, 4), -float(value)))
        results[value] = fork

    threads = [threading.Thread(target=decode, args=(value,)) for value in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for value, fork in results.items():
        assert torch.equal(fork.keys[:, :, :10], keys)
        assert torch.equal(fork.keys[:, :, 11:], torch.full((1, 2, 50, 4), float(value)))
        assert torch.equal(fork.values[:, :, 11:], torch.full((1, 2, 50, 4), -float(value)))
