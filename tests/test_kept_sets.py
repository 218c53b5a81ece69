"""On hand-made keys, queries and attention, each method keeps the tokens its paper says it keeps."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvsqueeze
from kvsqueeze.cache import EvictingLayer
from kvsqueeze.hooks import LayerContext, attention_modules
from kvsqueeze.methods.expected_attention import mean_rotation
from conftest import tiny_model

MODEL = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16


def context(keys, values=None, queries=None, weights=None):
    layer = EvictingLayer()
    layer.update(keys, torch.ones_like(keys) if values is None else values)
    hidden = torch.zeros(keys.shape[0], keys.shape[2], MODEL.config.hidden_size)
    return LayerContext(module=attention_modules(MODEL)[0], layer=layer, hidden_states=hidden,
                        captured_queries=queries, attention_weights=weights)


def kept(method, ctx):
    method.compress(ctx)
    return [sorted(set(row.tolist())) for row in kept_positions(ctx)]


def kept_positions(ctx):
    """Recover positions by matching kept keys to the originals (keys are made unique in these tests)."""
    return [torch.cdist(ctx.layer.keys[0, h], ORIGINAL[id(ctx)][0, h]).argmin(-1) for h in range(ctx.n_kv_heads)]


ORIGINAL = {}


def make(keys, **kwargs):
    ctx = context(keys, **kwargs)
    ORIGINAL[id(ctx)] = keys.clone()
    return ctx


def unique_keys(tokens=10, scale=None):
    keys = torch.randn(1, 2, tokens, 16, generator=torch.Generator().manual_seed(0))
    if scale is not None:
        keys = keys / keys.norm(dim=-1, keepdim=True) * torch.tensor(scale, dtype=torch.float32)[None, None, :, None]
    return keys


def test_knorm_keeps_the_smallest_key_norms():
    norms = [3.0, 1.0, 2.0, 5.0, 0.5, 4.0]
    assert kept(kvsqueeze.KNorm(budget=2), make(unique_keys(6, norms))) == [[1, 4], [1, 4]]


def test_streaming_llm_keeps_sinks_and_the_most_recent():
    assert kept(kvsqueeze.StreamingLLM(budget=5, n_sink=2), make(unique_keys(10))) == [[0, 1, 7, 8, 9]] * 2


def test_keydiff_keeps_the_keys_that_point_away_from_the_others():
    keys = torch.zeros(1, 2, 8, 16)
    keys[..., 0] = 1.0
    keys += 0.01 * torch.randn(keys.shape, generator=torch.Generator().manual_seed(1))
    keys[:, :, 2, :] = 0.0
    keys[:, :, 2, 1] = 1.0  # orthogonal to the rest
    keys[:, :, 5, 0] = -1.0  # opposite to the rest
    assert kept(kvsqueeze.KeyDiff(budget=2), make(keys)) == [[2, 5], [2, 5]]


def attending_queries(target, tokens, new=None, strength=20.0):
    """Queries (4 heads) that attend to key `target`, which is made the only key with a large component."""
    keys = unique_keys(tokens) * 0.1
    keys[:, :, target, :] = 0.0
    keys[:, :, target, 3] = 1.0
    queries = torch.zeros(1, 4, new or tokens, 16)
    queries[..., 3] = strength
    return keys, queries


def test_snapkv_keeps_what_the_window_attends_to_and_the_window():
    keys, queries = attending_queries(target=10, tokens=40)
    got = kept(kvsqueeze.SnapKV(budget=7, window_size=4, kernel_size=3), make(keys, queries=queries))
    for head in got:
        assert set(range(36, 40)) <= set(head) and 10 in head


def test_tova_keeps_what_the_last_token_attends_to_in_every_head():
    keys, queries = attending_queries(target=5, tokens=20)
    got = kept(kvsqueeze.TOVA(budget=2), make(keys, queries=queries))
    assert got == [[5, 19], [5, 19]]


def test_observed_attention_normalises_by_the_queries_that_saw_each_token():
    tokens = 6
    weights = torch.zeros(1, 4, tokens, tokens)
    for q in range(tokens):
        weights[..., q, : q + 1] = 1.0 / (q + 1)  # uniform causal attention: early tokens get more in total
    weights[..., 5, :] = 0.0
    weights[..., 5, 4] = 1.0  # the last query only looks at token 4
    got = kept(kvsqueeze.ObservedAttention(budget=1), make(unique_keys(tokens), weights=weights))
    # token 5 is seen by one query with weight 0: its average is 0; token 4 averages (1/5 + 1) / 2, the highest
    assert got == [[4], [4]]


def test_random_is_reproducible_and_seeded():
    a = kept(kvsqueeze.Random(budget=4, seed=1), make(unique_keys(20)))
    b = kept(kvsqueeze.Random(budget=4, seed=1), make(unique_keys(20)))
    c = kept(kvsqueeze.Random(budget=4, seed=2), make(unique_keys(20)))
    assert a == b and a != c
    method = kvsqueeze.Random(budget=4, seed=1)
    kept(method, make(unique_keys(20)))
    method.setup(MODEL)  # every apply() starts the seed's sequence again
    assert kept(method, make(unique_keys(20))) == a


def test_pyramidkv_gives_lower_layers_more_tokens():
    model = tiny_model("llama", num_hidden_layers=6)
    ctx = kvsqueeze.compress(model, None, torch.randint(3, 256, (1, 200)), kvsqueeze.PyramidKV(ratio=0.5, window_size=8))
    lengths = ctx.cache.stored_lengths()
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    assert sum(lengths) / len(lengths) == pytest.approx(100, abs=1)


def test_expected_attention_mean_rotation_is_the_average_rope_rotation():
    rotary = MODEL.model.rotary_emb
    q = torch.randn(1, 1, 1, 16)
    positions = torch.arange(100, 140)
    cos, sin = rotary(q, positions[None])
    rotated = [apply_rotary_pos_emb(q, q, cos[:, i:i + 1], sin[:, i:i + 1])[0] for i in range(len(positions))]
    expected = torch.stack(rotated).mean(0).flatten()
    assert torch.allclose(q.flatten() @ mean_rotation(cos[0], sin[0], 16).T, expected, atol=1e-5)
