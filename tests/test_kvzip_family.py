"""KVzip, KVCompose, KVzap, FastKVzip: their scores and kept sets on hand-made cases, calibration files, real runs."""

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze.evaluation.needle import needle_sample
from conftest import cached, random_ids, tiny_model


def eager_reference(ids: torch.Tensor, family: str = "llama"):
    """The plain eager model (same weights as tiny_model(family)) on `ids`: (attentions per layer, cache)."""
    model = tiny_model(family, attn="eager")
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, **cached(cache), output_attentions=True)
    return out.attentions, cache


def kvzip_reference(ids: torch.Tensor, n_sink: int, groups: int) -> list[torch.Tensor]:
    """Without a tokenizer KVzip's reconstruction input is the context after the sinks, fed after the context; with
    one chunk its softmax covers every token, so a token's score is the most attention the repeated tokens pay it."""
    n = ids.shape[1]
    attentions, _ = eager_reference(torch.cat([ids, ids[:, n_sink:]], 1))
    return [a[0, :, n:, n_sink:n].amax(1).view(-1, groups, n - n_sink).amax(1) for a in attentions]


def test_kvzip_scores_are_the_max_attention_of_the_reconstruction():
    model, ids = tiny_model(), random_ids(40)
    method = kvsqueeze.KVzip(ratio=0.5)
    cache = kvsqueeze.SqueezeCache(model.config)
    kvsqueeze.pipeline.prefill(model, ids, cache, None)
    scores = method.importance(model, cache, ids)
    assert cache.layers[0].stored == 40  # the reconstruction ran on a fork
    for layer, expected in enumerate(kvzip_reference(ids, n_sink=4, groups=2)):
        assert torch.isinf(scores[layer][0, :, :4]).all()  # sinks are always kept
        torch.testing.assert_close(scores[layer][0, :, 4:], expected, atol=1e-5, rtol=1e-4)


def test_kvzip_reconstructs_chunk_by_chunk(monkeypatch):
    """One reconstruction forward per chunk; each scores its own chunk's tokens (attention probabilities)."""
    from kvsqueeze.methods import kvzip
    model, ids = tiny_model(), random_ids(30)
    inputs = []
    original = kvzip.observe
    monkeypatch.setattr(kvzip, "observe", lambda model, cache, repeat, *a, **k: inputs.append(repeat) or
                        original(model, cache, repeat, *a, **k))
    scores = kvsqueeze.KVzip(chunk_size=13, n_sink=4).importance(model, kvsqueeze.compress(model, None, ids).cache, ids)
    assert [r.tolist() for r in inputs] == [ids[:, 4:17].tolist(), ids[:, 17:30].tolist()]
    for layer in scores.values():
        assert ((layer[0, :, 4:] > 0) & (layer[0, :, 4:] <= 1)).all()


@pytest.mark.parametrize("level", ["pair", "layer", "head"])
def test_kvzip_keeps_the_highest_scores_at_its_level(level):
    model, ids = tiny_model(), random_ids(60)
    method = kvsqueeze.KVzip(ratio=0.5, level=level)
    full = kvsqueeze.compress(model, None, ids)
    scores = method.importance(model, full.cache, ids)
    ctx = kvsqueeze.compress(model, None, ids, method)
    kept = [layer.kept_per_head()[0] for layer in ctx.cache.layers]
    assert sum(int(k.sum()) for k in kept) == 30 * 2 * 4  # the budget, exactly
    masks = [kvsqueeze.methods.kvzip.select([scores[i]], torch.tensor([60]), "head", method.allocation, [60])[0]
             for i in range(4)] if level == "head" else None
    if level == "head":
        for i, layer in enumerate(ctx.cache.layers):
            index = masks[i][0].nonzero()[:, 1].view(2, 30)
            expected = full.cache.layers[i].keys[0].gather(1, index[..., None].expand(-1, -1, 16))
            assert torch.equal(layer.keys[0], expected)
        return
    groups = [torch.cat([s[0].flatten() for s in scores.values()])] if level == "pair" else \
        [s[0].flatten() for s in scores.values()]
    per_group = [sum(int(k.sum()) for k in kept)] if level == "pair" else [int(k.sum()) for k in kept]
    for values, n_kept in zip(groups, per_group):
        ranked = values.sort(descending=True).values
        assert ranked[n_kept - 1] >= ranked[n_kept]  # what is kept scores at least as much as what is not
    if level != "head":
        assert len({int(h) for k in kept for h in k}) > 1  # heads keep different numbers of tokens


def test_kvzip_with_a_chat_template_keeps_the_header_and_repeats_the_context(bundled):
    model, tokenizer = bundled
    prompt = kvsqueeze.prompt.Prompt.for_tokenizer(tokenizer)
    ids = prompt.context_ids("The cat sat on the mat. " * 10)[0]
    sink = kvsqueeze.methods.kvzip.sink_length(prompt, ids, 4)
    header = tokenizer(prompt.prefix, add_special_tokens=False).input_ids
    assert sink == len(header) > 4
    (start, end, repeat), = kvsqueeze.methods.kvzip.repeat_inputs(prompt, ids, sink, 2000, 8)
    text = tokenizer.decode(repeat[0])
    assert (start, end) == (sink, len(ids)) and "Repeat the previous context exactly." in text
    assert text.endswith(tokenizer.decode(ids[sink:])) and "assistant" in text


def test_kvcompose_composite_tokens_set_the_layer_budgets():
    """Hand-made scores, 3 layers x 2 heads x 4 tokens, ratio 0.5: 6 composite tokens over the layers."""
    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.2], [0.2, 0.8, 0.1, 0.3]],
                           [[0.7, 0.65, 0.6, 0.05], [0.05, 0.55, 0.62, 0.7]],
                           [[0.01, 0.02, 0.03, 0.04], [0.01, 0.02, 0.03, 0.04]]])[None]
    # composites (mean of the heads' j-th best): [0.85, 0.4, 0.2, 0.1], [0.7, 0.635, 0.575, 0.05], [0.04, ...];
    # the first layer takes the best of all layers: [0.85, 0.635, 0.575, 0.1]. The 6 best: 3 in layers 0 and 1,
    # none in layer 2, which keeps 1 all the same
    keep = kvsqueeze.KVCompose(ratio=0.5).keep_masks(scores, [4])[0]
    assert [[row.nonzero()[:, 0].tolist() for row in layer] for layer in keep] == [
        [[0, 2, 3], [0, 1, 3]], [[0, 1, 2], [1, 2, 3]], [[3], [3]]]
    unstructured = kvsqueeze.KVCompose(ratio=0.5, structured=False).keep_masks(scores, [4])[0]
    assert int(unstructured.sum()) == 12 and unstructured.sum(-1).tolist() != [[4, 4], [4, 4], [4, 4]]


def test_kvcompose_scores_are_the_second_pass_attention():
    model, ids = tiny_model(), random_ids(30)
    method = kvsqueeze.KVCompose(ratio=0.5, add_mean_across_heads=False)
    scores = method.scores(model, kvsqueeze.compress(model, None, ids).cache, ids)
    attentions, _ = eager_reference(torch.cat([ids, ids], 1))
    for layer, weights in enumerate(attentions):
        expected = weights[0, :, 30:, :30].amax(1).view(2, 2, 30).mean(1)
        torch.testing.assert_close(scores[layer][0], expected, atol=1e-5, rtol=1e-4)


def test_kvcompose_layers_are_dense_and_of_different_lengths(family):
    model = tiny_model(family)
    ctx = kvsqueeze.compress(model, None, random_ids(100), kvsqueeze.KVCompose(ratio=0.5))
    compressed = [layer for layer in ctx.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    assert all(isinstance(layer, kvsqueeze.EvictingLayer) for layer in compressed)
    assert sum(layer.stored for layer in compressed) == 50 * len(compressed)
    if len(compressed) > 2:
        assert len({layer.stored for layer in compressed}) > 1
    assert ctx.generate(random_ids(5, seed=1), max_new_tokens=4).shape == (1, 4)


@pytest.mark.parametrize("name", ["kvzip", "kvcompose"])
def test_extra_pass_methods_refuse_chunks_and_say_so(name):
    model = tiny_model()
    method = kvsqueeze.available()[name](ratio=0.5)
    assert method.has("changes_prefill") and method.has("whole_context")
    with pytest.raises(ValueError, match="chunk_size"):
        kvsqueeze.compress(model, None, random_ids(50), method, chunk_size=16)


@pytest.mark.parametrize("name", ["kvzip", "kvcompose"])
def test_budget_in_tokens_over_layers(name):
    model = tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(100), kvsqueeze.available()[name](budget=40))
    kept = [layer.kept_per_head().float().mean().item() for layer in ctx.cache.layers]
    assert sum(kept) / len(kept) == pytest.approx(40, abs=0.5)


@pytest.mark.parametrize("method", [kvsqueeze.KVzip(ratio=0.5), kvsqueeze.KVzip(ratio=0.5, plus=True),
                                    kvsqueeze.KVCompose(ratio=0.5)], ids=repr)
def test_end_to_end_on_the_bundled_model(bundled, method):
    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 300, 0.5, seed=7)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, method)
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert ctx.stats.bytes_held <= 0.56 * ctx.stats.bytes_uncompressed
    assert sample.correct(ctx.ask(sample.question, max_new_tokens=24))


def attention_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention input (the normed residual stream) for `ids`, from the plain model."""
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        return [layer.input_layernorm(h) for layer, h in zip(model.model.layers, states)]


def test_kvzap_keeps_each_heads_top_predicted_scores():
    from kvsqueeze.methods.kvzap import Surrogate
    model, ids = tiny_model(), random_ids(40)
    surrogate = Surrogate.for_model(model, "linear")
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.KVzap(ratio=0.5, surrogate=surrogate))
    full = kvsqueeze.compress(model, None, ids)
    for i, x in list(enumerate(attention_inputs(model, ids)))[1:]:  # layer 0's inputs tie for repeated tokens
        with torch.no_grad():
            index = surrogate(i, x).topk(20, dim=-1).indices.sort(-1).values[0]  # [kv_heads, 20]
        expected = full.cache.layers[i].keys[0].gather(1, index[..., None].expand(-1, -1, 16))
        torch.testing.assert_close(ctx.cache.layers[i].keys[0], expected)


def test_kvzap_threshold_keeps_what_passes_and_the_window():
    from kvsqueeze.methods.kvzap import Surrogate
    model, ids = tiny_model(), random_ids(60)
    surrogate = Surrogate.for_model(model, "mlp", hidden_dim=8)
    with torch.no_grad():
        scores = [surrogate(i, x)[0] for i, x in enumerate(attention_inputs(model, ids))]
    threshold = float(torch.cat([s.flatten() for s in scores]).median())
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.KVzap(surrogate=surrogate, threshold=threshold, window_size=8))
    for layer, s in zip(ctx.cache.layers, scores):
        expected = ((s >= threshold) | (torch.arange(60) >= 52)).sum(-1)
        assert layer.kept_per_head()[0].tolist() == expected.tolist()
    assert 0.2 < ctx.stats.compression_ratio < 0.6


def test_kvzap_says_how_to_get_a_surrogate(tmp_path):
    from kvsqueeze.methods.kvzap import Surrogate
    with pytest.raises(ValueError, match="train_surrogate"):
        kvsqueeze.KVzap(ratio=0.5)
    with pytest.raises(FileNotFoundError, match="train_surrogate"):
        kvsqueeze.compress(tiny_model(), None, random_ids(20), kvsqueeze.KVzap(surrogate=tmp_path / "none.safetensors"))
    other = tmp_path / "other.safetensors"
    Surrogate(2, 64, 2).save(other)
    with pytest.raises(ValueError, match="not this model"):
        kvsqueeze.compress(tiny_model(), None, random_ids(20), kvsqueeze.KVzap(surrogate=other))
    with pytest.raises(ValueError, match="not both"):
        kvsqueeze.KVzap(ratio=0.5, surrogate=other, threshold=-3)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kvzap_surrogate_trains_on_the_bundled_model_and_round_trips(bundled, tmp_path, kind):
    from kvsqueeze.methods.kvzap import Surrogate, train_surrogate
    model, tokenizer = bundled
    path = tmp_path / "kvzap.safetensors"
    surrogate = train_surrogate(model, tokenizer, samples=2, tokens=150, kind=kind, hidden_dim=32, epochs=2,
                                out=path, progress=False)
    loaded = Surrogate.load(path)
    x = torch.randn(1, 5, 576)
    assert torch.equal(surrogate(4, x), loaded(4, x)) and loaded.kind == kind
    sample = needle_sample(tokenizer, 300, 0.5, seed=7)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.KVzap(ratio=0.5, surrogate=str(path)))
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert isinstance(ctx.ask(sample.question, max_new_tokens=12), str)


def reconstruction(model, ids, repeat, attention=None, grad=False, callback=None):
    """Each compressible layer's input hidden states in a reconstruction forward of `repeat` after `ids`, `callback`
    seeing each layer (with `grad`, the gradients of the last layer's squared outputs wrt each pre-MLP residual
    stream, KVgrad's)."""
    from kvsqueeze.methods.kvgrad import captured_residuals, differentiable
    from kvsqueeze.methods.kvzip import observe
    cache, states = kvsqueeze.compress(model, None, ids).cache, {}

    def seen(ctx):
        states[ctx.layer_idx] = ctx.hidden_states
        if callback is not None:
            callback(ctx)

    if not grad:
        with torch.no_grad():
            observe(model, cache, repeat, seen, None, start=ids.shape[1], attention=attention)
        return states
    with differentiable(model), captured_residuals(model) as captured:
        observe(model, cache, repeat, seen, None, start=ids.shape[1], attention=attention)
        return torch.autograd.grad(captured["last"].pow(2).sum(), [captured["residual"][i] for i in states])


@pytest.mark.parametrize("span", [(4, 4, 40), (4, 10, 22), (0, 0, 40)], ids=["all", "a chunk", "no sinks"])
def test_the_reconstruction_attention_is_the_models_and_records_the_softmax_normaliser(family, span):
    """KVzip's reconstruction forward computes the model's attention as merged parts: the same hidden states; and
    each query's log normaliser over the scored tokens and the new ones, as `attention_to` would compute it."""
    from kvsqueeze.methods.kvzip import real_positions
    from kvsqueeze.methods.reconstruction import Reconstruction, attention_to, log_normaliser
    model, ids = tiny_model(family), random_ids(40)
    attention, sink, start, end = Reconstruction(*span), *span

    def check(ctx):
        positions = real_positions(ctx)
        columns = torch.cat([positions[:sink], positions[start:end]])
        recorded = attention.normaliser(ctx, columns)
        torch.testing.assert_close(recorded, log_normaliser(ctx, columns))
        torch.testing.assert_close(attention_to(ctx, columns, normaliser=recorded), attention_to(ctx, columns))

    fused = reconstruction(model, ids, ids[:, 4:], attention, callback=check)
    plain = reconstruction(model, ids, ids[:, 4:])
    assert sorted(fused) == sorted(plain) == sorted(attention.normalisers)
    for layer in fused:
        torch.testing.assert_close(fused[layer], plain[layer], atol=1e-5, rtol=1e-5)


def test_the_reconstruction_attention_gives_the_models_gradients():
    """KVgrad differentiates through the merged parts: their kernels give no gradient through a normaliser, which
    the merge must not need."""
    from kvsqueeze.methods.reconstruction import Reconstruction
    model, ids = tiny_model(), random_ids(40)
    attention = Reconstruction(4, 4, 20)
    fused = reconstruction(model, ids, ids[:, 4:20], attention, grad=True)
    assert len(attention.normalisers) == len(fused)
    for got, expected in zip(fused, reconstruction(model, ids, ids[:, 4:20], grad=True)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_a_padded_batch_scores_as_each_context_alone():
    model = tiny_model()
    short, long = random_ids(30, seed=1), random_ids(45, seed=2)
    ids = torch.cat([torch.cat([torch.zeros(1, 15, dtype=torch.long), short], 1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 15, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1),
                      torch.ones(1, 45, dtype=torch.long)])
    method = kvsqueeze.KVzip(ratio=0.5, chunk_size=20)
    cache = kvsqueeze.SqueezeCache(model.config)
    kvsqueeze.pipeline.prefill(model, ids, cache, None, attention_mask=mask)
    batch = method.importance(model, cache, ids, mask)
    for row, alone in enumerate([short, long]):
        single = method.importance(model, kvsqueeze.compress(model, None, alone).cache, alone)
        for layer, scores in single.items():
            got = batch[layer][row][:, -alone.shape[1]:]
            torch.testing.assert_close(got, scores[0], atol=1e-5, rtol=1e-4)
