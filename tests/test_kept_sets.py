"""On hand-made keys, queries and attention, each method keeps the tokens its paper says it keeps."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvsqueeze
from kvsqueeze.cache import EvictingLayer, SqueezeCache
from kvsqueeze.context import LayerContext, last_queries_attention
from kvsqueeze.models import attention_modules
from kvsqueeze.methods.expected_attention import mean_rotation
from conftest import tiny_model

MODEL = tiny_model("llama")  # 4 query heads, 2 KV heads, head_dim 16


def context(keys, values=None, queries=None, weights=None):
    cache = SqueezeCache(layers=[EvictingLayer()])
    cache.layers[0].update(keys, torch.ones_like(keys) if values is None else values)
    hidden = torch.zeros(keys.shape[0], keys.shape[2], MODEL.config.hidden_size)
    return LayerContext(module=attention_modules(MODEL)[0], cache=cache, hidden_states=hidden,
                        observed_queries=queries, attention_weights=weights)


def kept(method, ctx):
    method.compress(ctx)
    return [sorted(set(row.tolist())) for row in kept_positions(ctx)]


def kept_positions(ctx):
    """Recover positions by matching kept keys to the originals (keys are made unique in these tests)."""
    keys, _, real = ctx.view()
    rows = [keys[0, h] if real is None else keys[0, h][real[0, h]] for h in range(ctx.n_kv_heads)]
    return [torch.cdist(row, ORIGINAL[id(ctx)][0, h]).argmin(-1) for h, row in enumerate(rows)]


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


class Fixed(kvsqueeze.ScorerMethod):
    """Test scorer: returns the scores it was given."""

    def __init__(self, scores, **kwargs):
        super().__init__(**kwargs)
        self.fixed = scores

    def score(self, ctx):
        return self.fixed


def lengths(ctx):
    return ctx.layer.kept_per_head()[0].tolist()


def test_adakv_gives_the_budget_to_the_head_that_needs_it_with_a_safeguard():
    keys = unique_keys(20, [1.0] * 20)
    keys[:, 1] *= 10  # head 1's keys all have large norms: KNorm ranks all of head 0 first
    ctx = make(keys)
    kvsqueeze.AdaKV(ratio=0.5, scorer="knorm").compress(ctx)
    assert lengths(ctx) == [18, 2]  # 2 x 10 tokens in all; head 1 keeps its safeguard floor(0.2 x 10) = 2
    assert isinstance(ctx.layer, kvsqueeze.RaggedLayer)


def test_criticalkv_keeps_a_low_scored_token_whose_value_moves_the_output():
    keys = unique_keys(10)
    values = torch.ones_like(keys) * 0.01
    values[:, :, 7] = 100.0
    scores = torch.linspace(1, 0.1, 10).expand(1, 2, 10).clone()  # token 7 ranks 8th of 10
    ctx = make(keys, values=values)
    kvsqueeze.CriticalKV(budget=4, scorer=Fixed(scores)).compress(ctx)
    # stage 1: the 2 best scores (tokens 0, 1); stage 2: score x projected value norm favours token 7
    assert [sorted(p.tolist()) for p in kept_positions(ctx)][0][:2] == [0, 1]
    assert all(7 in p.tolist() for p in kept_positions(ctx))


def test_simlayerkv_trims_only_lazy_layers():
    keys, queries = attending_queries(target=0, tokens=30, strength=40.0)
    lazy = make(keys, queries=queries)
    kvsqueeze.SimLayerKV(lazy_threshold=0.9, n_initial=2, n_recent=3).compress(lazy)
    assert [sorted(p.tolist()) for p in kept_positions(lazy)] == [[0, 1, 27, 28, 29]] * 2
    keys, queries = attending_queries(target=12, tokens=30, strength=40.0)
    busy = make(keys, queries=queries)
    kvsqueeze.SimLayerKV(lazy_threshold=0.9, n_initial=2, n_recent=3).compress(busy)
    assert busy.layer.stored == 30


def test_think_keeps_the_channels_queries_and_keys_use_and_frees_key_bytes():
    keys = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    keys[..., [2, 5, 11]] *= 50
    queries = torch.randn(1, 4, 40, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    queries[..., [2, 5, 11, 13]] *= 50  # channel 13 is large in queries only
    ctx = make(keys, queries=queries)
    before = ctx.layer.nbytes()
    kvsqueeze.ThinK(key_channel_ratio=0.5, window_size=8).compress(ctx)
    layer = ctx.layer
    channels = layer.channels()[0]
    assert channels.shape == (2, 8) and all({2, 5, 11} <= set(c.tolist()) for c in channels)
    assert layer.pages_k.shape[-1] == 8 and layer.kept_per_head().tolist() == [[40, 40]]
    key_bytes = layer.pages_k.nbytes
    assert key_bytes <= 0.5 * keys.nbytes * 1.25 and layer.nbytes() < before


def test_dms_keeps_scores_above_the_threshold_and_the_recent_window():
    scores = torch.tensor([[[5.0, -1, 3, -2, -3, 4, -1, -1, -1, -1], [-5.0, -1, -3, 2, -3, -4, -1, 1, -1, -1]]])
    ctx = make(unique_keys(10))
    kvsqueeze.DMS(threshold=0.0, scorer=Fixed(scores), window_size=2).compress(ctx)
    assert [sorted(p.tolist()) for p in kept_positions(ctx)] == [[0, 2, 5, 8, 9], [3, 7, 8, 9]]


def test_duo_attention_streaming_heads_keep_sink_and_recent():
    gates = torch.ones(4, 2)
    gates[0, 1] = 0.1  # layer 0, KV head 1 is the one streaming head
    method = kvsqueeze.DuoAttention(head_patterns=gates, sparsity=1 / 8, sink_size=2, recent_size=3)
    method.setup(MODEL)
    ctx = make(unique_keys(20))
    method.compress(ctx)
    assert [sorted(p.tolist()) for p in kept_positions(ctx)] == [list(range(20)), [0, 1, 17, 18, 19]]


def test_headkv_budgets_follow_head_importance():
    importance = torch.tensor([[0.1, 0.5], [0.1, 0.1], [0.1, 0.1], [0.05, 0.05]])
    method = kvsqueeze.HeadKV(budget=20, head_scores=importance, window_size=2)
    method.setup(MODEL)
    counts = method.budget.layer_counts(100, 0).tolist()
    assert counts[1] > counts[0] and sum(method.budget.layer_counts(100, i).sum().item() for i in range(4)) == \
        pytest.approx(8 * 20, abs=4)


def test_lagkv_keeps_sinks_the_last_partition_and_what_stands_out_from_the_next_partition():
    keys = torch.randn(1, 2, 13, 16, generator=torch.Generator().manual_seed(3)) * 0.1
    spike = torch.tensor([5.0, -5.0] * 8)
    keys[0, :, 2], keys[0, :, 6] = spike, -spike  # the most spread token of partitions 1..4 and 5..8
    method = kvsqueeze.LagKV(budget=7, n_sink=1, lag_size=4)
    assert kept(method, make(keys)) == [[0, 2, 6, 9, 10, 11, 12]] * 2


def test_lagkv_evicts_the_same_share_of_every_partition():
    keys = torch.randn(1, 2, 4 + 8 * 16, 16, generator=torch.Generator().manual_seed(4))
    ctx = make(keys)
    kvsqueeze.LagKV(budget=4 + 7 * 8 + 16, n_sink=4, lag_size=16).compress(ctx)
    positions = kept_positions(ctx)[0]
    per_partition = torch.bincount((positions[positions >= 4] - 4) // 16, minlength=8)
    assert per_partition.tolist() == [8] * 7 + [16]  # half of every scored partition; the last (no reference) whole


def test_chunkkv_keeps_whole_chunks_by_their_mean_score():
    norms = [1.0, 9.0, 2.0, 2.1, 9.0, 9.1, 3.0, 3.1, 9.2, 9.3]
    assert kept(kvsqueeze.KNorm(budget=4), make(unique_keys(10, norms))) == [[0, 2, 3, 6]] * 2
    chunks = kvsqueeze.ChunkKV(budget=4, scorer="knorm", chunk_length=2)
    assert kept(chunks, make(unique_keys(10, norms))) == [[2, 3, 6, 7]] * 2


def test_composed_methods_each_compress_what_the_previous_one_left():
    norms = [3.0, 1.0, 2.0, 5.0, 0.5, 4.0, 2.5, 0.7, 6.0, 0.9]
    chain = kvsqueeze.Composed([kvsqueeze.StreamingLLM(budget=6, n_sink=2), kvsqueeze.KNorm(budget=3)])
    assert kept(chain, make(unique_keys(10, norms))) == [[1, 7, 9]] * 2
    built = kvsqueeze.methods.build("composed", params=['methods=["streaming_llm", "think:key_channel_ratio=0.5"]'])
    assert [m.name for m in built.methods] == ["streaming_llm", "think"] and built.has("whole_context")


def test_a_chain_refuses_pre_rope_keys_after_an_earlier_method_compressed():
    from conftest import random_ids

    leverage, knorm = kvsqueeze.LeverageScore(ratio=0.5), kvsqueeze.KNorm(ratio=0.75)
    first = kvsqueeze.compress(MODEL, None, random_ids(40), kvsqueeze.Composed([leverage, knorm]))
    assert [layer.stored for layer in first.cache.layers] == [10] * 4
    with pytest.raises(RuntimeError, match="put the method that needs them first"):
        kvsqueeze.compress(MODEL, None, random_ids(40), kvsqueeze.Composed([kvsqueeze.KNorm(ratio=0.25), leverage]))


def test_per_layer_compression_gives_each_layer_its_ratio():
    from conftest import random_ids

    ratios = [0.0, 0.25, 0.5, 0.75]
    ctx = kvsqueeze.compress(MODEL, None, random_ids(100), kvsqueeze.PerLayerCompression(ratios))
    assert [layer.stored for layer in ctx.cache.layers] == [100, 75, 50, 25]
    with pytest.raises(ValueError, match="4 compressible layers"):
        kvsqueeze.compress(MODEL, None, random_ids(100), kvsqueeze.PerLayerCompression([0.5, 0.5]))
    with pytest.raises(ValueError, match="ratio"):
        kvsqueeze.PerLayerCompression([0.5, 1.0, 0.5, 0.5])


def identity_rotary(n):
    return torch.ones(1, n, 16), torch.zeros(1, n, 16)  # cos, sin: pre-RoPE keys are the keys themselves


def test_leverage_score_keeps_the_key_off_the_others_subspace():
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(16, generator=g)
    keys = torch.randn(1, 2, 20, 1, generator=g) * direction + 0.01 * torch.randn(1, 2, 20, 16, generator=g)
    keys[0, :, 7] = torch.randn(16, generator=g) * 3  # the one key pointing elsewhere
    ctx = make(keys, queries=torch.randn(1, 4, 20, 16, generator=g))
    ctx.position_embeddings = identity_rotary(20)
    assert kept(kvsqueeze.LeverageScore(budget=1), ctx) == [[7], [7]]


def test_non_causal_attention_counts_attention_from_earlier_queries_to_later_keys():
    keys = unique_keys(12)
    queries = (keys[:, :, 9] * 20).repeat_interleave(2, 1)[:, :, None, :].expand(1, 4, 12, 16).clone()
    ctx = make(keys, queries=queries)  # every query, the first ones included, looks at token 9
    # the scores are smoothed over 3 neighbours: token 9 and the two beside it
    assert kept(kvsqueeze.NonCausalAttention(budget=3, chunk_size=16), ctx) == [[8, 9, 10], [8, 9, 10]]


def test_compactor_protects_sinks_and_the_last_tokens():
    g = torch.Generator().manual_seed(6)
    keys = unique_keys(30)
    ctx = make(keys, queries=torch.randn(1, 4, 30, 16, generator=g))
    ctx.position_embeddings = identity_rotary(30)
    kept_sets = kept(kvsqueeze.Compactor(budget=14), ctx)
    for positions in kept_sets:
        assert set(range(8)) | set(range(26, 30)) <= set(positions) and len(positions) == 14


@pytest.mark.parametrize("mode", ["pivot", "weighted"])
def test_merging_folds_each_evicted_token_into_its_most_similar_kept_token(mode):
    keys = torch.zeros(1, 2, 4, 16)
    keys[..., 0, 0], keys[..., 1, 1], keys[..., 2, 0], keys[..., 3, 1] = 1.0, 1.0, 2.0, 3.0
    keys[..., 2, 1] = 0.2  # token 2 points almost like token 0, token 3 like token 1
    values = torch.arange(4.0)[None, None, :, None].expand(1, 2, 4, 16).clone()
    ctx = context(keys, values)
    recent = kvsqueeze.StreamingLLM(n_sink=0)
    kvsqueeze.Merging(budget=2, scorer=recent, merge=mode).compress(ctx)  # keeps 2 and 3, evicts 0 and 1
    layer = ctx.layer
    similarity = torch.nn.functional.cosine_similarity(keys[0, 0, 0], keys[0, 0, 2], dim=0)
    if mode == "pivot":  # kept 2 absorbs 0: mean of itself and (0 + 2) / 2
        expected_value_2, expected_value_3 = (2 + (0 + 2) / 2) / 2, (3 + (1 + 3) / 2) / 2
    else:  # weighted by (similarity + 1) / 2
        w = (similarity + 1) / 2
        expected_value_2, expected_value_3 = (2 + w * 0) / (1 + w), (3 + 1 * 1) / (1 + 1)
    assert layer.stored == 2
    assert torch.allclose(layer.values[0, :, 0, 0], torch.tensor(float(expected_value_2)), atol=1e-5)
    assert torch.allclose(layer.values[0, :, 1, 0], torch.tensor(float(expected_value_3)), atol=1e-5)
