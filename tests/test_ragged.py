"""The ragged layer and its attention: equal to dense attention over the same kept keys, with real memory freed."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvsqueeze
from kvsqueeze.ragged import ragged_attention
from kvsqueeze.ragged import RaggedLayer
from conftest import cached, random_ids, tiny_model


def masked_attention(keys, values, keep, query, scaling, channels=None):
    """Reference: dense attention over all keys, evicted ones masked out; new tokens causal.

    With `channels` [batch, heads, kept], the stored (not the new) keys only use those channels.
    """
    batch, heads, n, dim = keys.shape
    group = query.shape[1] // heads
    q_len = query.shape[2]
    if channels is not None:
        used = torch.zeros(batch, heads, 1, dim).scatter_(-1, channels[:, :, None, :], 1.0)
        keys = torch.cat([keys[:, :, : n - q_len] * used, keys[:, :, n - q_len:]], dim=2)
    logits = query @ keys.repeat_interleave(group, 1).transpose(-1, -2) * scaling
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    visible = torch.cat([keep[:, :, None, : n - q_len].expand(-1, -1, q_len, -1),
                         causal.expand(batch, heads, -1, -1)], -1).repeat_interleave(group, 1)
    weights = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    return (weights @ values.repeat_interleave(group, 1)).transpose(1, 2)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       n=st.integers(1, 70), q_len=st.integers(1, 5), page_size=st.sampled_from([None, 2, 16]),
       pruned_channels=st.sampled_from([0, 3]), seed=st.integers(0, 10_000))
def test_ragged_attention_equals_masked_dense_attention(batch, kv_heads, group, n, q_len, page_size, pruned_channels,
                                                        seed):
    g = torch.Generator().manual_seed(seed)
    dim = 8
    keys, values = torch.randn(batch, kv_heads, n + q_len, dim, generator=g), torch.randn(batch, kv_heads, n + q_len, dim, generator=g)
    # per-head budgets from 0 to n, with 0 and 1 among them
    budgets = torch.randint(0, n + 1, (batch, kv_heads), generator=g)
    budgets.view(-1)[0] = 0
    if budgets.numel() > 1:
        budgets.view(-1)[1] = min(1, n)
    order = torch.rand(batch, kv_heads, n, generator=g).argsort(-1)
    keep = torch.zeros(batch, kv_heads, n, dtype=torch.bool)
    keep.scatter_(-1, order, torch.arange(n)[None, None, :] < budgets[..., None])
    channels = None
    if pruned_channels:
        channels = torch.rand(batch, kv_heads, dim, generator=g).argsort(-1)[..., : dim - pruned_channels].sort(-1).values
    layer = RaggedLayer.from_dense(keys[:, :, :n], values[:, :, :n], keep, seen=n, page_size=page_size,
                                   key_channels=channels)
    tail, tail_values = layer.update(keys[:, :, n:], values[:, :, n:])
    assert torch.equal(tail, keys[:, :, n:])
    query = torch.randn(batch, kv_heads * group, q_len, dim, generator=g)
    got = ragged_attention(layer, query, scaling=dim ** -0.5)
    expected = masked_attention(keys, values, keep, query, dim ** -0.5, channels)
    assert torch.allclose(got, expected, atol=1e-5)
    assert layer.kept_per_head().tolist() == (budgets + q_len).tolist()


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 3), n=st.integers(1, 50), seed=st.integers(0, 999))
def test_dense_view_gives_back_the_kept_tokens_in_order(batch, heads, n, seed):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, heads, n, 4, generator=g), torch.randn(batch, heads, n, 4, generator=g)
    keep = torch.rand(batch, heads, n, generator=g) < 0.5
    layer = RaggedLayer.from_dense(keys, values, keep, seen=n, page_size=4)
    dense_keys, dense_values, real = layer.dense_view()
    for b in range(batch):
        for h in range(heads):
            assert torch.equal(dense_keys[b, h][real[b, h]], keys[b, h][keep[b, h]])
            assert torch.equal(dense_values[b, h][real[b, h]], values[b, h][keep[b, h]])


def test_bytes_are_the_kept_tokens_plus_less_than_a_page_per_head_plus_the_index():
    keys = torch.randn(1, 3, 1000, 64)
    keep = torch.zeros(1, 3, 1000, dtype=torch.bool)
    keep[0, 0, :100], keep[0, 1, :500], keep[0, 2, :] = True, True, True
    layer = RaggedLayer.from_dense(keys, keys, keep, seen=1000, page_size=16)
    kept_bytes = 1600 * 64 * 4 * 2
    assert kept_bytes <= layer.nbytes() <= kept_bytes + 3 * 15 * 64 * 4 * 2 + 1024
    assert layer.n_pages == 7 + 32 + 63


class PerHeadBudget(kvsqueeze.ScorerMethod):
    """Keeps a different share of tokens in each KV head (a test method: head h keeps (h+1)/(heads+1))."""

    def compress(self, ctx):
        batch, heads, n, _ = ctx.keys.shape
        keep = torch.zeros(batch, heads, n, dtype=torch.bool)
        for h in range(heads):
            keep[:, h, -max(1, n * (h + 1) // (heads + 1)):] = True
        ctx.keep(keep)


class KeepAllRagged(kvsqueeze.ScorerMethod):
    """Keeps every token, but forces a ragged layer (a test method)."""

    def compress(self, ctx):
        from kvsqueeze.ragged import RaggedLayer
        layer = ctx.layer
        mask = torch.ones(layer.keys.shape[:-1], dtype=torch.bool)
        ctx.cache.layers[ctx.layer_idx] = RaggedLayer.from_dense(layer.keys, layer.values, mask, layer.seen)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3", "mistral", "qwen2"])
def test_a_ragged_layer_keeping_everything_reproduces_the_model(family):
    model = tiny_model(family)
    context, question = random_ids(60), random_ids(5, seed=1)
    full = kvsqueeze.compress(model, None, context)
    ragged = kvsqueeze.compress(model, None, context, KeepAllRagged())
    assert any(isinstance(layer, RaggedLayer) for layer in ragged.cache.layers)
    with torch.no_grad(), kvsqueeze.attached(model):
        expected = model(question, **cached(full.cache.fork())).logits
        got = model(question, **cached(ragged.cache.fork())).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(ragged.generate(question, max_new_tokens=5), full.generate(question, max_new_tokens=5))


def test_per_head_budgets_really_free_memory_and_generate():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(120), PerHeadBudget())
    layers = ctx.cache.layers
    assert all(isinstance(layer, RaggedLayer) for layer in layers)
    assert layers[0].kept_per_head().tolist() == [[40, 80]]
    assert ctx.nbytes() < 0.75 * ctx.stats.bytes_uncompressed
    tokens = ctx.generate(random_ids(4, seed=2), max_new_tokens=6, num_beams=2)
    assert tokens.shape == (1, 6)
