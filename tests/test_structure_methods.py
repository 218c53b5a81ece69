"""Structure methods: key re-rotation (and Finch, which uses it), per-chunk and block-wise compression."""

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze.methods.base import Method, ScorerMethod
from kvsqueeze.methods.key_rerotation import KeyRerotation
from conftest import cached, random_ids, tiny_model


class KeepIndices(Method):
    """Keeps hand-picked token indices, per KV head (one list for all heads, or one list per head)."""

    def __init__(self, per_head):
        self.per_head = per_head

    def compress(self, ctx):
        mask = torch.zeros(ctx.keys.shape[:3], dtype=torch.bool)
        for head in range(ctx.n_kv_heads):
            index = self.per_head[head] if isinstance(self.per_head[0], list) else self.per_head
            mask[:, head, index] = True
        ctx.keep(mask)


def keys_at(model, ids, positions, layer=0):
    """Layer `layer`'s keys of the plain model for `ids` placed at `positions`: [1, kv_heads, n, dim]."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cached(cache), position_ids=torch.as_tensor(positions)[None])
    return cache.layers[layer].keys


def question_logits(model, cache, question):
    with torch.no_grad(), kvsqueeze.attached(model):  # a compressed cache is read through kvsqueeze's attention
        return model(question, **cached(cache.fork())).logits


# -- KeyRerotation --

def test_rerotating_a_method_that_keeps_everything_changes_nothing():
    model = tiny_model("llama")
    ids, question = random_ids(40), random_ids(5, seed=1)
    everything = list(range(40))
    plain = kvsqueeze.compress(model, None, ids, KeepIndices(everything))
    rerotated = kvsqueeze.compress(model, None, ids, KeyRerotation(method=KeepIndices(everything)))
    for a, b in zip(plain.cache.layers, rerotated.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(question_logits(model, plain.cache, question), question_logits(model, rerotated.cache, question))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "mistral"])
def test_one_layer_model_answers_as_if_the_kept_tokens_were_the_whole_context(family):
    """A layer-0 key depends only on its token and its position: after re-rotation, a one-layer model's cache is
    that of the kept tokens prefilled alone, up to a shift of all positions, which rotary attention ignores."""
    model = tiny_model(family, num_hidden_layers=1)
    ids, question = random_ids(30), random_ids(5, seed=3)
    kept = [0, 1, 2, 5, 8, 13, 21, 22, 29]
    expected = model(torch.cat([ids[:, kept], question], 1)).logits[:, -5:]
    ctx = kvsqueeze.compress(model, None, ids, KeyRerotation(method=KeepIndices(kept)))
    assert torch.allclose(question_logits(model, ctx.cache, question), expected, atol=1e-5)
    gaps = kvsqueeze.compress(model, None, ids, KeepIndices(kept))  # without re-rotation: the evicted gaps remain
    assert not torch.allclose(question_logits(model, gaps.cache, question), expected, atol=1e-3)


def test_each_head_keeps_its_tokens_at_consecutive_positions_ending_at_the_context_end():
    """Heads keeping different numbers of tokens (a ragged layer) each close their own gaps."""
    model = tiny_model("llama")
    ids = random_ids(30)
    per_head = [[0, 3, 4, 10, 17, 29], [1, 2, 5, 6, 7, 8, 9, 20, 25, 28]]
    ctx = kvsqueeze.compress(model, None, ids, KeyRerotation(method=KeepIndices(per_head)))
    layer = ctx.cache.layers[0]
    assert isinstance(layer, kvsqueeze.RaggedLayer)
    keys, _, real = layer.dense_view()
    for head, kept in enumerate(per_head):
        expected = keys_at(model, ids[:, kept], range(30 - len(kept), 30))[0, head]
        assert torch.allclose(keys[0, head][real[0, head]], expected, atol=1e-5)


def test_rerotation_after_every_chunk_of_a_chunked_prefill():
    """StreamingLLM keeps 4 sinks and the newest tokens after each chunk; re-rotated each time, the kept keys end up
    at consecutive positions, and a one-layer model answers as on the kept tokens alone."""
    model = tiny_model("llama", num_hidden_layers=1)
    ids, question = random_ids(50), random_ids(4, seed=5)
    method = KeyRerotation(method=kvsqueeze.StreamingLLM(budget=12))
    ctx = kvsqueeze.compress(model, None, ids, method, chunk_size=16)
    kept = list(range(4)) + list(range(42, 50))
    assert ctx.cache.layers[0].stored == 12 and ctx.cache.get_seq_length() == 50
    assert torch.allclose(ctx.cache.layers[0].keys, keys_at(model, ids[:, kept], range(38, 50)), atol=1e-5)
    expected = model(torch.cat([ids[:, kept], question], 1)).logits[:, -4:]
    assert torch.allclose(question_logits(model, ctx.cache, question), expected, atol=1e-5)


def test_rerotation_in_a_padded_batch_equals_each_row_alone():
    model = tiny_model("qwen3")
    rows = [random_ids(40)[0], random_ids(23, seed=2)[0]]
    method = KeyRerotation(method="knorm", ratio=0.5)
    batch = kvsqueeze.compress(model, None, rows, method)
    question = random_ids(5, seed=9)
    answers = batch.generate(question, max_new_tokens=5)
    for i, row in enumerate(rows):
        alone = kvsqueeze.compress(model, None, row, method)
        assert torch.equal(answers[i], alone.generate(question, max_new_tokens=5)[0])


def test_rerotation_of_a_decoding_method_runs_while_generating():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(40), KeyRerotation(method="knorm", ratio=0.5))
    decode = KeyRerotation(method=kvsqueeze.H2O(budget=24))
    tokens = ctx.generate(random_ids(4, seed=1), decode_method=decode, max_new_tokens=12, min_new_tokens=12)
    assert tokens.shape == (1, 12)


def test_key_rerotation_settings():
    method = KeyRerotation(ratio=0.25, method="adakv")
    assert isinstance(method.method, kvsqueeze.AdaKV) and method.method.settings()["ratio"] == 0.25
    assert repr(method).startswith("KeyRerotation(method=AdaKV(ratio=0.25")
    assert KeyRerotation(method=kvsqueeze.H2O(budget=64)).phase == kvsqueeze.H2O.phase == "both"
    with pytest.raises(ValueError, match="wrapped method itself"):
        KeyRerotation(ratio=0.5, method=kvsqueeze.SnapKV(ratio=0.5))
    with pytest.raises(NotImplementedError, match="pruned"):
        kvsqueeze.compress(tiny_model(), None, random_ids(40), KeyRerotation(method=kvsqueeze.ThinK()))
    for evicts_after_prefill in (kvsqueeze.KVzip(ratio=0.5), kvsqueeze.Composed(["knorm", "kvcompose"])):
        with pytest.raises(ValueError, match="evicts after the prefill"):
            KeyRerotation(method=evicts_after_prefill)


# -- Finch --

class Recording(ScorerMethod):
    """Records the keys, values, queries... count of each context it scores, and scores by a rule."""

    def __init__(self, rule, ratio=None, budget=None):
        super().__init__(ratio, budget)
        self.rule, self.sizes = rule, []

    def score(self, ctx):
        self.sizes.append(ctx.n_stored)
        assert ctx.n_new == ctx.n_stored and ctx.queries.shape[2] == ctx.n_stored
        return self.rule(ctx)


def test_finch_window_is_what_follows_the_last_delimiter():
    finch = kvsqueeze.Finch(delimiter_id=7, window_size=4)
    ids = torch.tensor([[3, 7, 5, 5, 7, 5, 5, 5], [3, 3, 3, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3, 3, 7]])
    finch.before_forward({"input_ids": ids})
    assert finch._windows.tolist() == [3, 4, 0]  # no delimiter: window_size


def test_finch_scores_are_the_questions_normalised_attention():
    """Scores against the eager model's own attention weights: each question query's weights times the number of
    keys it sees, averaged over the question and the query heads of each KV head; the question always kept."""
    model = tiny_model("llama", attn="eager")
    ids = random_ids(40)
    ids[ids == 7] = 8
    ids[0, 30] = 7  # the delimiter: the question is the last 9 tokens
    captured = {}

    class Captured(kvsqueeze.Finch):
        name = ""

        def score(self, ctx):
            captured.setdefault(ctx.layer_idx, super().score(ctx))
            return captured[ctx.layer_idx]

    ctx = kvsqueeze.compress(model, None, ids, Captured(ratio=0.5, delimiter_id=7, rerotate_keys=False))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions[0][0]  # layer 0: [heads, 40, 40]
    window = 9
    normalised = weights[:, -window:] * torch.arange(32, 41)[None, :, None]
    expected = normalised.mean(1).view(2, 2, 40).mean(1)  # 4 query heads, 2 per KV head
    scores = captured[0][0]
    assert torch.isinf(scores[:, -window:]).all()
    assert torch.allclose(scores[:, :-window], expected[:, :-window], atol=1e-5)
    kept = (expected[:, :-window].topk(20 - window).indices.sort().values).tolist()
    for head in range(2):  # the layer's kept keys are those of the best tokens and of the question
        index = kept[head] + list(range(31, 40))
        full = kvsqueeze.compress(model, None, ids).cache.layers[0].keys
        assert torch.equal(ctx.cache.layers[0].keys[0, head], full[0, head, index])


def test_finch_rerotates_as_key_rerotation_does():
    model = tiny_model("qwen3")
    ids = random_ids(60)
    finch = kvsqueeze.compress(model, None, ids, kvsqueeze.Finch(ratio=0.5, window_size=8))
    wrapped = kvsqueeze.compress(model, None, ids,
                                 KeyRerotation(method=kvsqueeze.Finch(ratio=0.5, window_size=8, rerotate_keys=False)))
    unrotated = kvsqueeze.compress(model, None, ids, kvsqueeze.Finch(ratio=0.5, window_size=8, rerotate_keys=False))
    for a, b, c in zip(finch.cache.layers, wrapped.cache.layers, unrotated.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, c.values)
    assert not torch.equal(finch.cache.layers[0].keys, unrotated.cache.layers[0].keys)


# -- Chunk --

def test_chunk_scores_each_chunk_alone_and_keeps_the_same_share_of_each():
    model = tiny_model("llama")
    ids = random_ids(33)
    full = kvsqueeze.compress(model, None, ids).cache.layers[0].keys
    scorer = Recording(lambda ctx: -ctx.keys.float().norm(dim=-1))  # KNorm
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.Chunk(ratio=0.5, scorer=scorer, chunk_length=10))
    assert scorer.sizes[:4] == [10, 10, 10, 3]  # layer 0 scores each chunk alone
    norms = full[0].norm(dim=-1)  # [heads, 33]
    for head in range(2):  # 16 kept of 33: 5 + 5 + 5 + 1, the smallest key norms of each chunk
        index = [i for start, k in [(0, 5), (10, 5), (20, 5), (30, 1)]
                 for i in (start + norms[head, start:start + 10].topk(k, largest=False).indices).tolist()]
        assert torch.equal(ctx.cache.layers[0].keys[0, head], full[0, head, sorted(index)])


def test_chunk_snapkv_keeps_each_chunks_own_window():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(64),
                             kvsqueeze.Chunk(ratio=0.5, scorer=kvsqueeze.SnapKV(window_size=4), chunk_length=16))
    full = kvsqueeze.compress(model, None, random_ids(64)).cache.layers[0].keys
    kept = ctx.cache.layers[0].keys[0, 0]
    for end in (16, 32, 48, 64):  # the last 4 tokens of every chunk are its observation window, kept
        window = full[0, 0, end - 4:end]
        assert all(any(torch.equal(key, k) for k in kept) for key in window)


def test_chunk_and_block_refuse_chunked_prefill():
    model = tiny_model("llama")
    for method in (kvsqueeze.Chunk(ratio=0.5), kvsqueeze.Block(ratio=0.5)):
        with pytest.raises(ValueError, match="chunk_size"):
            kvsqueeze.compress(model, None, random_ids(40), method, chunk_size=16)


# -- Block --

@pytest.mark.parametrize("newest", [True, False])
def test_block_keeps_the_budget_block_after_block(newest):
    """A scorer preferring the newest tokens of what it sees ends with the last tokens; preferring the oldest, with the
    first ones. Each scoring sees the kept tokens plus one block."""
    model = tiny_model("llama")
    ids = random_ids(30)
    full = kvsqueeze.compress(model, None, ids).cache.layers[0].keys
    order = (lambda ctx: torch.arange(ctx.n_stored, dtype=torch.float).expand(ctx.keys.shape[:3])) if newest else \
        (lambda ctx: -torch.arange(ctx.n_stored, dtype=torch.float).expand(ctx.keys.shape[:3]))
    scorer = Recording(order)
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.Block(budget=10, scorer=scorer, block_size=8))
    assert scorer.sizes[:6] == [18, 18, 14] * 2  # layer 0: per head, 10 kept + blocks of 8, 8, 4
    expected = full[..., 20:, :] if newest else full[..., :10, :]
    assert torch.equal(ctx.cache.layers[0].keys, expected)


def test_block_with_a_scorer_blind_to_the_others_is_the_scorers_own_choice():
    model = tiny_model("qwen2")
    ids = random_ids(100)
    block = kvsqueeze.compress(model, None, ids, kvsqueeze.Block(ratio=0.6, scorer="knorm", block_size=16))
    knorm = kvsqueeze.compress(model, None, ids, kvsqueeze.KNorm(ratio=0.6))
    for a, b in zip(block.cache.layers, knorm.cache.layers):
        assert torch.equal(a.keys, b.keys)


# -- the bundled model, end to end --

def test_end_to_end_on_the_bundled_model(bundled):
    from kvsqueeze.evaluation.needle import needle_sample

    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 400, 0.4, seed=2)
    for method in (KeyRerotation(ratio=0.5, method="snapkv"), kvsqueeze.Chunk(ratio=0.5, chunk_length=128),
                   kvsqueeze.Block(ratio=0.5)):
        ctx = kvsqueeze.compress(model, tokenizer, sample.context, method)
        assert ctx.stats.bytes_held <= 0.55 * ctx.stats.bytes_uncompressed
        assert isinstance(ctx.ask(sample.question, max_new_tokens=12), str)
    # Finch sees the question: context, a separator token, the question; then the answer is asked for
    separator = tokenizer.eos_token
    finch = kvsqueeze.Finch(ratio=0.5, delimiter_id=tokenizer.convert_tokens_to_ids(separator))
    ctx = kvsqueeze.compress(model, tokenizer, sample.context + separator + sample.question, finch)
    assert ctx.stats.bytes_held <= 0.55 * ctx.stats.bytes_uncompressed
    key = sample.needle.split(" for the ")[1].split(" is ")[0]
    assert key in ctx.ask("", max_new_tokens=24)  # the question was kept: the answer is about it
