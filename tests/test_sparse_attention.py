"""Methods that change which stored keys attention reads, not what the cache holds: Quest (decoding) and
MInference (prefill)."""

from types import SimpleNamespace

import pytest
import torch

import kvsqueeze
from kvsqueeze import compress
from kvsqueeze.attention import AttentionCall
from kvsqueeze.cache import EvictingLayer, Room
from kvsqueeze.evaluation.needle import needle_sample
from kvsqueeze.methods.minference import vertical_slash_attention, vertical_slash_pattern
from kvsqueeze.methods.quest import page_bounds
from conftest import cached, random_ids, tiny_model
from test_methods import reference


def decode_step(model, ctx, method, token, perturb=None):
    """Logits of one decoding step on a fork of `ctx`'s cache under `method`; `perturb(layer_idx, layer)` may edit
    the fork's layers first."""
    cache = ctx.cache.fork()
    for i, layer in enumerate(cache.layers):
        if perturb is not None and isinstance(layer, EvictingLayer):
            perturb(i, layer)
    with torch.no_grad(), method.apply(model):
        return model(token, **cached(cache)).logits


# -- Quest --

def test_page_bound_is_quests_formula_and_bounds_every_key_of_the_page():
    query, low, high = torch.tensor([1.0, -2.0]), torch.tensor([[0.0, 1.0]]), torch.tensor([[3.0, 2.0]])
    assert page_bounds(query, low, high).tolist() == [1 * 3 + (-2) * 1]
    keys = torch.randn(50, 16, 8)  # 50 pages of 16 keys
    query = torch.randn(8)
    bounds = page_bounds(query, keys.amin(1), keys.amax(1))
    assert (bounds >= (keys @ query).amax(1) - 1e-5).all()


def test_quest_reads_the_newest_page_and_the_best_bounded_others():
    quest = kvsqueeze.Quest(budget=12, page_size=4, dense_layers=0)  # 3 pages: the newest and 2 by their bound
    key = torch.randn(1, 2, 30, 8, generator=torch.Generator().manual_seed(0)) * 0.1
    query = torch.zeros(1, 4, 1, 8)
    query[0, :2, 0, 0] = 1  # query heads 0 and 1 (KV head 0) look along channel 0
    query[0, 2:, 0, 1] = 1  # heads 2 and 3 (KV head 1) along channel 1
    key[0, 0, 9, 0] = 5  # page 2 of KV head 0
    key[0, 0, 21, 0] = 3  # page 5
    key[0, 1, 2, 1] = 4  # page 0 of KV head 1
    key[0, 1, 17, 1] = 6  # page 4
    layer = EvictingLayer()
    value = torch.randn(1, 2, 30, 8)
    seen = {}

    def attend(module, query, key, value, mask, **kwargs):
        seen.update(key=key, value=value, mask=mask)
        return "output"

    call = AttentionCall(SimpleNamespace(layer_idx=0), query, key, value, None, fn=attend)
    assert quest.attend(layer, call) == "output"
    index = quest.selected[0]
    assert index[0, 0].tolist() == [8, 9, 10, 11, 20, 21, 22, 23, 28, 29]  # pages 2, 5 and the newest (7, partial)
    assert index[0, 1].tolist() == [0, 1, 2, 3, 16, 17, 18, 19, 28, 29]  # pages 0, 4 and the newest
    assert torch.equal(seen["key"][0, 0], key[0, 0, index[0, 0]]) and seen["value"].shape == (1, 2, 10, 8)
    low, high = quest.metadata[layer]
    assert low.shape == (1, 2, 7, 8)  # the 7 complete pages before the newest
    assert torch.equal(high[0, 0, 2], key[0, 0, 8:12].amax(0))
    assert torch.equal(low[0, 1, 4], key[0, 1, 16:20].amin(0))


@pytest.mark.parametrize("dense_layers", [0, 2])
def test_quest_with_a_budget_over_the_context_is_exact(family, dense_layers):
    model = tiny_model(family)
    context, question = random_ids(150, seed=1), random_ids(7, seed=2)
    _, expected = reference(model, context, question, new_tokens=8)
    ctx = compress(model, None, context)
    quest = kvsqueeze.Quest(budget=1024, dense_layers=dense_layers)
    assert torch.equal(ctx.generate(question, quest, max_new_tokens=8)[0], expected)
    assert quest.stats()["read_fraction"] == 1.0


def test_quest_decodes_reading_fewer_bytes_on_every_family(family):
    model = tiny_model(family)
    ctx = compress(model, None, random_ids(200, seed=1))
    quest = kvsqueeze.Quest(budget=48, dense_layers=0)
    tokens = ctx.generate(random_ids(5, seed=2), quest, max_new_tokens=8)
    assert tokens.shape == (1, 8)
    stats = quest.stats()
    assert stats["steps"] == 7 and stats["bytes_read_per_step"] < 0.5 * stats["bytes_dense_read_per_step"]
    assert stats["bytes_held"] > ctx.nbytes()  # the cache grew by the question and answer, plus the page metadata


def test_quest_reads_only_the_selected_pages():
    model = tiny_model("llama")
    ctx = compress(model, None, random_ids(200, seed=1))
    token = random_ids(1, seed=2)
    quest = kvsqueeze.Quest(budget=48, dense_layers=1)
    logits = decode_step(model, ctx, quest, token)
    selected = dict(quest.selected)
    assert sorted(selected) == [1, 2, 3]  # layer 0 reads everything

    def unread(index, layer):  # the index also holds the position of the step's own token, not stored yet
        batch, heads, stored = layer.values.shape[:3]
        return torch.ones(batch, heads, stored + 1, dtype=torch.bool).scatter_(-1, index, False)[..., :stored]

    def perturb_unread(i, layer):  # values only: the page bounds come from the keys
        if i in selected:
            layer.values = layer.values.masked_fill(unread(selected[i], layer)[..., None], 1e4)

    assert torch.equal(decode_step(model, ctx, quest, token, perturb_unread), logits)
    assert {i: s.tolist() for i, s in quest.selected.items()} == {i: s.tolist() for i, s in selected.items()}

    def perturb_read(i, layer):
        if i == 3:
            layer.values = layer.values.clone()
            layer.values[0, 0, int(selected[3][0, 0, 0])] += 10

    assert not torch.equal(decode_step(model, ctx, quest, token, perturb_read), logits)


def test_quest_measures_bytes_held_and_read():
    model = tiny_model("llama")  # 4 full-attention layers, 2 KV heads of dim 16, float32: 256 bytes per token
    ctx = compress(model, None, random_ids(200, seed=1))
    quest = kvsqueeze.Quest(budget=48, page_size=16, dense_layers=1)
    ctx.generate(random_ids(5, seed=2), quest, max_new_tokens=10)
    stored = 200 + 5 + 9  # the context, the question, 9 fed answer tokens
    pages = (stored - 1) // 16  # complete pages before the newest, with metadata
    metadata = 3 * 2 * (2 * pages * 16 * 4)  # 3 Quest layers x min and max x [2 heads, pages, 16] floats
    stats = quest.stats()
    assert stats["bytes_metadata"] == metadata
    room = 200 + 5 + 1 + Room.SPARE  # decoded tokens are written into room made at the first one, counted as held
    assert stats["bytes_held"] == 4 * room * 256 + metadata
    last = quest.steps[-1]
    read_tokens = 2 * 16 + stored - pages * 16  # two best pages and the newest, partly filled
    assert last["bytes_dense_read"] == 4 * stored * 256
    assert last["bytes_read"] == stored * 256 + metadata + 3 * read_tokens * 256
    assert stats["read_fraction"] < 0.5


def test_a_wrapper_keeps_the_methods_own_attention():
    """Composed routes the model's attention through Quest's as Quest alone does: same answer, same bytes read."""
    model = tiny_model("llama")
    ctx, question = compress(model, None, random_ids(200, seed=1)), random_ids(5, seed=2)
    alone, wrapped = kvsqueeze.Quest(budget=32), kvsqueeze.Quest(budget=32)
    expected = ctx.generate(question, alone, max_new_tokens=8)
    assert torch.equal(ctx.generate(question, kvsqueeze.Composed([wrapped]), max_new_tokens=8), expected)
    assert wrapped.steps == alone.steps and len(wrapped.steps) == 7


def test_quest_budget_as_a_fraction_of_the_stored_tokens():
    quest = kvsqueeze.Quest(budget=0.25)
    assert quest.pages_read(1024) == 16 and quest.pages_read(64) == 2
    assert kvsqueeze.Quest(budget=1024).pages_read(10**5) == 64
    assert repr(quest) == "Quest(budget=0.25, page_size=16, dense_layers=2)"


def test_quest_end_to_end_on_the_bundled_model(bundled):
    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 400, 0.5, seed=3)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context)
    quest = kvsqueeze.Quest(budget=192)  # of ~450 tokens (at 128 it drops a digit of the number)
    answer = ctx.ask(sample.question, decode_method=quest, max_new_tokens=24)
    assert sample.correct(answer), answer
    stats = quest.stats()  # all 30 layers, the first two dense
    assert stats["read_fraction"] < 0.55 and stats["bytes_metadata"] > 0


# -- MInference --

def block_reference_mask(q_len, stored, columns, offsets, block=64):
    """Per query row, the keys MInference's kernel reads: slash ranges of its block, columns, causal."""
    allowed = torch.zeros(q_len, stored, dtype=torch.bool)
    for row in range(q_len):
        position = stored - q_len + row
        first = stored - q_len + row // block * block
        last = min(first + block - 1, stored - 1)
        for offset in offsets.tolist():
            if last - offset >= 0:
                allowed[row, max(first - offset, 0):last - offset + 1] = True
        allowed[row, columns[columns <= last]] = True
        allowed[row, position + 1:] = False
    return allowed


@pytest.mark.parametrize("q_len", [300, 100])  # a whole prefill, and a chunk after 200 stored tokens
def test_vertical_slash_attention_reads_exactly_its_pattern(q_len):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 3, n, 16, generator=generator) for n in (q_len, 300, 300))
    columns = torch.stack([torch.randperm(300, generator=generator)[:20] for _ in range(3)])[None]
    offsets = torch.stack([torch.randperm(300, generator=generator)[:30] for _ in range(3)])[None]
    out = vertical_slash_attention(query, key, value, columns, offsets, 0.25)
    for head in range(3):
        mask = block_reference_mask(q_len, 300, columns[0, head], offsets[0, head])
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, head], key[:, head], value[:, head], attn_mask=mask, scale=0.25)
        torch.testing.assert_close(out[:, head], expected)
    everything = vertical_slash_attention(query, key, value, columns, torch.arange(300).expand(1, 3, -1), 0.25)
    dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=torch.ones(
        q_len, 300, dtype=torch.bool).tril(300 - q_len), scale=0.25)
    torch.testing.assert_close(everything, dense)


def test_vertical_slash_pattern_finds_the_attended_column_and_diagonal():
    stored, dim = 400, 128
    key = torch.randn(1, 1, stored, dim, generator=torch.Generator().manual_seed(1)) * 0.01
    query = torch.zeros(1, 1, stored, dim)
    query[..., 127] = 1
    key[0, 0, 250, 127] = 20  # a column every query attends to
    rows = torch.arange(64)
    query[0, 0, stored - 64 + rows, rows] = 20  # each of the last 64 queries has its own direction...
    key[0, 0, stored - 64 + rows - 150, rows] = 1  # ...shared with the key 150 tokens back: a slash
    columns, offsets = vertical_slash_pattern(query, key, 1.0, vertical_size=31, slash_size=101)
    assert set(columns[0, 0].tolist()) == set(range(30)) | {250}  # the 30 sinks and the column
    assert set(offsets[0, 0].tolist()) == set(range(100)) | {150}  # the 100 local diagonals and the slash


def test_minference_settings_that_read_everything_are_exact(family):
    model = tiny_model(family)
    context, question = random_ids(150, seed=1), random_ids(7, seed=2)
    expected_logits, expected = reference(model, context, question)
    ctx = compress(model, None, context, kvsqueeze.MInference(slash_size=150))
    with torch.no_grad(), kvsqueeze.attached(model):
        assert torch.equal(model(question, **cached(ctx.cache.fork())).logits, expected_logits)
    assert torch.equal(ctx.generate(question, max_new_tokens=6)[0], expected)


def test_minference_prefill_is_sparse_and_keeps_the_whole_cache(family, monkeypatch):
    model = tiny_model(family)
    context = random_ids(300, seed=1)
    dense = compress(model, None, context)
    calls = []
    original = kvsqueeze.methods.minference.vertical_slash_attention
    monkeypatch.setattr(kvsqueeze.methods.minference, "vertical_slash_attention",
                        lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    sparse = compress(model, None, context, kvsqueeze.MInference(vertical_size=30, slash_size=50))
    full_layers = [i for i, layer in enumerate(dense.cache.layers) if isinstance(layer, EvictingLayer)]
    assert len(calls) == len(full_layers)
    assert sparse.stats.compression_ratio == 0 and sparse.nbytes() == dense.nbytes()
    # layer 0 is computed from the same inputs: identical keys; its attention output differs, so later layers do
    first = full_layers[0]
    assert torch.equal(sparse.cache.layers[first].keys, dense.cache.layers[first].keys)
    assert not torch.equal(sparse.cache.layers[full_layers[-1]].keys, dense.cache.layers[full_layers[-1]].keys)
    tokens = sparse.generate(random_ids(5, seed=2), max_new_tokens=4)
    assert tokens.shape == (1, 4)


def test_minference_leaves_short_forwards_and_padded_batches_dense():
    model = tiny_model("llama")
    short = random_ids(60, seed=1)  # no more new tokens than the 64 estimating queries
    sparse = compress(model, None, short, kvsqueeze.MInference(vertical_size=30, slash_size=50))
    dense = compress(model, None, short)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(sparse.cache.layers, dense.cache.layers))
    rows = [random_ids(300, seed=1)[0], random_ids(200, seed=2)[0]]
    batch = compress(model, None, rows, kvsqueeze.MInference(vertical_size=30, slash_size=50))
    alone = compress(model, None, rows[1][None])
    torch.testing.assert_close(batch.cache.layers[3].keys[1, :, -200:], alone.cache.layers[3].keys[0])


def test_minference_end_to_end_on_the_bundled_model(bundled):
    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 400, 0.5, seed=3)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.MInference(vertical_size=64, slash_size=128))
    answer = ctx.ask(sample.question, max_new_tokens=24)
    assert sample.correct(answer), answer
    assert ctx.stats.compression_ratio == 0
