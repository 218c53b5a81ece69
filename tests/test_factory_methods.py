"""KVCache-Factory's methods: NACL, Scissorhands, CAM, MiniCache: kept sets on hand-made cases, tiny models, bundled model."""

import pytest
import torch
import torch.nn.functional as F

import kvsqueeze
from kvsqueeze.cache import EvictingLayer, SqueezeCache
from kvsqueeze.context import LayerContext, last_queries_attention
from kvsqueeze.models import attention_modules
from kvsqueeze.methods.cam import merge_into_next
from kvsqueeze.merged import MergedLayer, MergedPair, slerp
from conftest import forward_cache, output_cache, random_ids, tiny_model

MODEL = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16


def context(keys, values=None, queries=None):
    cache = SqueezeCache(layers=[EvictingLayer()])
    cache.layers[0].update(keys, torch.ones_like(keys) if values is None else values)
    hidden = torch.zeros(keys.shape[0], keys.shape[2], MODEL.config.hidden_size)
    return LayerContext(module=attention_modules(MODEL)[0], cache=cache, hidden_states=hidden, observed_queries=queries)


def kept_positions(ctx, original):
    """Positions of the kept tokens of each head, found by matching kept keys to the (unique) original ones."""
    keys = ctx.layer.keys
    return [sorted(torch.cdist(keys[0, h], original[0, h]).argmin(-1).tolist()) for h in range(keys.shape[1])]


def attended(tokens, targets, strengths=None):
    """Keys (unique, small) and queries [1, 4, tokens, 16] whose every row attends to the `targets` keys; a key
    target gets channel 3 + i, and `strengths[i]` (default 20) is the query's component on it."""
    keys = torch.randn(1, 2, tokens, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    queries = torch.zeros(1, 4, tokens, 16)
    for i, target in enumerate(targets):
        keys[:, :, target, :] = 0.0
        keys[:, :, target, 3 + i] = 1.0
        queries[..., 3 + i] = 20.0 if strengths is None else strengths[i]
    return keys, queries


# NACL


def test_nacl_keeps_the_proxy_tokens_and_what_they_attend_to():
    keys, queries = attended(12, [2, 5], [20.0, 15.0])
    ctx = context(keys, queries=queries)
    kvsqueeze.NACL(budget=6, proxy_size=4, random_ratio=0.0).compress(ctx)
    assert kept_positions(ctx, keys) == [[2, 5, 8, 9, 10, 11]] * 2


def test_nacl_samples_a_share_of_the_budget_by_proxy_attention():
    keys, queries = attended(12, [2, 5, 0], [20.0, 15.0, 12.0])  # after 2 and 5, token 0 carries most attention
    picks = []
    for seed in range(40):
        ctx = context(keys, queries=queries)
        method = kvsqueeze.NACL(budget=7, proxy_size=4, random_ratio=0.2, seed=seed)  # 1 of the 7 sampled
        method.setup(MODEL)
        method.compress(ctx)
        for positions in kept_positions(ctx, keys):
            assert len(positions) == 7 and {2, 5, 8, 9, 10, 11} <= set(positions)  # proxies + top-2 by score
            picks.append((set(positions) - {2, 5, 8, 9, 10, 11}).pop())
    assert max(set(picks), key=picks.count) == 0  # drawn in proportion to the proxies' attention
    assert len(set(picks)) > 1  # but drawn: other tokens too


def test_nacl_draws_are_seeded():
    keys, queries = attended(30, [2], [3.0])
    runs = []
    for _ in range(2):
        ctx = context(keys, queries=queries)
        method = kvsqueeze.NACL(budget=12, proxy_size=4, random_ratio=0.5, seed=3)
        method.setup(MODEL)
        method.compress(ctx)
        runs.append(kept_positions(ctx, keys))
    assert runs[0] == runs[1]


def test_nacl_decides_once_from_the_whole_context():
    with pytest.raises(ValueError, match="chunk by chunk"):
        kvsqueeze.compress(tiny_model("llama"), None, random_ids(60), kvsqueeze.NACL(ratio=0.5), chunk_size=20)


# Scissorhands


def test_scissorhands_keeps_the_persistently_important_tokens_and_the_recent_window():
    keys, queries = attended(10, [1, 4])
    queries[:, :, 8:, 4] = 0.0  # the last two queries only attend to token 1: token 4 was important twice of 4
    queries[:, :, :6] = 0.0  # queries before the history window attend to nothing in particular
    ctx = context(keys, queries=queries)
    method = kvsqueeze.Scissorhands(budget=8, history_window=4, recent_window=2, drop_ratio=0.5)
    method.compress(ctx)  # 10 tokens > 8: keeps 4, the 2 recent ones and the 2 least often unimportant
    assert kept_positions(ctx, keys) == [[1, 4, 8, 9]] * 2
    assert torch.equal(ctx.layer.recall("scissorhands"), torch.zeros(1, 2, 4))  # counting starts again


def test_scissorhands_counts_only_the_history_window():
    keys, queries = attended(10, [1, 4])
    queries[:, :, 6:, 4] = 0.0  # token 4 is important only to queries 0-5, before the history window
    ctx = context(keys, queries=queries)
    kvsqueeze.Scissorhands(budget=8, history_window=4, recent_window=2, drop_ratio=0.5).compress(ctx)
    assert 4 not in kept_positions(ctx, keys)[0]


def test_scissorhands_holds_its_budget_while_generating():
    model = tiny_model("llama")
    method = kvsqueeze.Scissorhands(budget=50)
    held = []
    handle = model.base_model.register_forward_hook(
        lambda m, args, kwargs, out: held.append(max(layer.stored for layer in forward_cache(kwargs).layers)),
        with_kwargs=True)
    try:
        with method.apply(model):
            out = model.generate(random_ids(120), attention_mask=torch.ones(1, 120, dtype=torch.long),
                                 max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    finally:
        handle.remove()
    cache = output_cache(out)
    assert cache.get_seq_length() == 149
    # the prompt leaves 25 (half the budget dropped); 26 steps later a drop again to 25, then 3 more steps
    assert held == [25] + [25 + k if k <= 25 else 25 + k - 26 for k in range(1, 30)]
    assert all(layer.stored == 28 for layer in cache.layers)
    assert cache.layers[0].recall("scissorhands").shape == (1, 2, 28)


# CAM


def test_cam_spreads_an_evicted_value_over_the_next_kept_tokens():
    values = torch.eye(6)[None, None]  # token i's value is the unit vector i
    keep = torch.tensor([False, True, False, True, True, False])[None, None]
    attention = torch.tensor([1.0, 0.5, 0.0, 0.5, 0.5, 1.0])[None, None]
    merged = merge_into_next(values, attention, keep, ~keep, merge_budget=2, generator=torch.Generator())
    expected = values.clone()
    expected[0, 0, 1, 0] = 0.5  # token 0 (above its window's attention: merged for sure) into 1, the kept one of 1-2
    # token 2 (no attention: never merged) and token 5 (no token after it) leave the others as they were
    assert torch.equal(merged, expected)


def test_cam_merges_with_the_attention_ratio_as_probability():
    n = 4000
    keep = torch.arange(n) % 2 == 1  # evicted and kept alternate
    attention = torch.where(keep, 1.0, 0.3)[None, None]
    values = torch.ones(1, 1, n, 1)
    merged = merge_into_next(values, attention, keep[None, None], ~keep[None, None], merge_budget=1,
                             generator=torch.Generator().manual_seed(0))
    rate = (merged[0, 0, keep, 0] - 1).mean()  # each kept token gets its predecessor with probability 0.3
    assert rate == pytest.approx(0.3, abs=0.03)


def test_cam_keeps_the_scorers_tokens_and_merges_values_only():
    keys = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(1))
    values = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(2))
    queries = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(3))
    ctx = context(keys, values, queries)
    method = kvsqueeze.CAM(budget=4, scorer=kvsqueeze.StreamingLLM(n_sink=1), merge_budget=2)
    method.setup(MODEL)
    method.compress(ctx)  # keeps 0, 5, 6, 7; evicted 3 and 4 are 2 positions or less from 5 and 6
    layer = ctx.layer
    assert torch.equal(layer.keys, keys[:, :, [0, 5, 6, 7]])
    assert torch.equal(layer.values[:, :, [0, 3]], values[:, :, [0, 7]])  # nothing evicted just before 0 or 7
    for head in range(2):
        assert not torch.equal(layer.values[0, head, 1:3], values[0, head, [5, 6]])


# MiniCache


def test_slerp_interpolates_along_the_great_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    angle = torch.pi / 2 * 0.6
    assert torch.allclose(slerp(a, b, 0.6), torch.tensor([torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))]))
    assert torch.allclose(slerp(a, a, 0.6), a)  # parallel directions


def filled(keys, values):
    layer = EvictingLayer()
    layer.update(keys, values)
    return layer


def test_minicache_shares_directions_keeps_magnitudes_and_retains_the_outliers():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 12, 16, generator=g)
    keys_a = base * torch.rand(1, 2, 12, 1, generator=g) * 3
    keys_b = (base + 0.05 * torch.randn(base.shape, generator=g)) * 2  # nearly the same directions...
    keys_b[:, :, 7] = -keys_b[:, :, 7]  # ...but token 7's points the other way
    values_a, values_b = keys_a.flip(-1), keys_b.flip(-1)
    first, second = filled(keys_a, values_a), filled(keys_b, values_b)
    pair = MergedPair(first, second, t=0.6, retention=0.05)
    assert pair.retained.nonzero()[:, -1].tolist() == [7, 7]  # one outlier per head
    a, b = MergedLayer(pair, 0, first), MergedLayer(pair, 1, second)
    assert a.shared_tensors()[0] is b.shared_tensors()[0]  # one direction tensor for the two layers
    for layer, keys, values in ((a, keys_a, values_a), (b, keys_b, values_b)):
        assert torch.equal(layer.keys[:, :, 7], keys[:, :, 7]) and torch.equal(layer.values[:, :, 7], values[:, :, 7])
        merged = torch.arange(12) != 7
        assert torch.allclose(layer.keys.norm(dim=-1), keys.norm(dim=-1), atol=1e-5)  # each layer's magnitudes
        direction = slerp(F.normalize(keys_a, dim=-1), F.normalize(keys_b, dim=-1), 0.6)
        assert torch.allclose(F.normalize(layer.keys, dim=-1)[:, :, merged], direction[:, :, merged], atol=1e-5)
        assert layer.stored == 12 and layer.get_seq_length() == 12


def held_storage(cache):
    """Bytes of every distinct storage the cache's layers reference (tensors found in their attributes)."""
    storages = {}

    def visit(item):
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, (list, tuple)):
            for x in item:
                visit(x)
        elif isinstance(item, dict):
            for x in item.values():
                visit(x)
        elif isinstance(item, MergedPair):
            visit(vars(item))

    for layer in cache.layers:
        visit({k: v for k, v in vars(layer).items() if k not in ("dtype", "device")})
    return sum(storages.values())


def test_minicache_reports_the_bytes_it_really_holds():
    model = tiny_model("llama")  # 4 layers: layers 2 and 3 are merged
    ctx = kvsqueeze.compress(model, None, random_ids(200), kvsqueeze.MiniCache())
    assert [type(layer) for layer in ctx.cache.layers] == [EvictingLayer, EvictingLayer, MergedLayer, MergedLayer]
    assert ctx.nbytes() == held_storage(ctx.cache)  # the shared directions counted once
    per_layer = ctx.stats.bytes_uncompressed / 4
    merged = ctx.nbytes() - 2 * per_layer
    # the two layers now hold one direction per token, 2 magnitudes each, the few retained tokens and a mask
    assert per_layer < merged < 1.2 * per_layer
    tokens = ctx.generate(random_ids(5, seed=1), max_new_tokens=8)
    assert torch.equal(tokens, ctx.generate(random_ids(5, seed=1), max_new_tokens=8))  # the context is left as it was
    assert ctx.nbytes() == held_storage(ctx.cache)
    assert ctx.cache.layers[3].stored == 200 and ctx.cache.layers[3].get_seq_length() == 200


def test_minicache_retaining_everything_reproduces_the_model():
    model = tiny_model("qwen2")
    context, question = random_ids(60, seed=1), random_ids(5, seed=2)
    plain = kvsqueeze.compress(model, None, context).generate(question, max_new_tokens=6)
    assert torch.equal(kvsqueeze.compress(model, None, context, kvsqueeze.MiniCache(retention=1.0))
                       .generate(question, max_new_tokens=6), plain)


def test_minicache_says_what_it_cannot_do():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="chunk by chunk"):
        kvsqueeze.compress(model, None, random_ids(60), kvsqueeze.MiniCache(), chunk_size=20)
    ctx = kvsqueeze.compress(model, None, random_ids(60), kvsqueeze.MiniCache())
    with pytest.raises(NotImplementedError):
        ctx.cache.layers[3].to_saved()


# every method on the bundled model


@pytest.mark.parametrize("method", [kvsqueeze.NACL(ratio=0.5), kvsqueeze.CAM(ratio=0.5),
                                    kvsqueeze.Scissorhands(budget=128), kvsqueeze.MiniCache()], ids=lambda m: m.name)
def test_end_to_end_on_the_bundled_model(bundled, method):
    model, tokenizer = bundled
    text = "The secret word is pineapple. " + "The sky is blue and the grass is green. " * 25
    ctx = kvsqueeze.compress(model, tokenizer, text, method)
    assert ctx.nbytes() < 0.8 * ctx.stats.bytes_uncompressed  # MiniCache: 14 of 30 layers merged, 0.78
    answer = ctx.ask("What colour is the sky?", max_new_tokens=20,
                     **({"decode_method": method} if method.phase == "both" else {}))
    assert isinstance(answer, str) and answer
