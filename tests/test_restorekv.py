"""RestoreKV: restore tokens in KVzip's budget, the adapter active for their pass only, generation after them,
its calibration file and training on the bundled model."""

import pytest
import torch

import kvsqueeze
from kvsqueeze.calibration import save_calibration
from kvsqueeze.evaluation.needle import needle_sample
from kvsqueeze.methods.restorekv import RestoreAdapter, train_restore
from conftest import cached, random_ids, tiny_model


def trained_like(model, seed: int = 0) -> RestoreAdapter:
    """An adapter whose LoRA is not zero (untrained ones start as the model itself)."""
    adapter = RestoreAdapter.for_model(model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for b in adapter.lora_b:
        b.data.normal_(0, 0.05, generator=generator)
    return adapter


def greedy(model, cache, question: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding fed token by token onto `cache`, positions from the cache's logical length."""
    tokens = []
    with torch.no_grad(), kvsqueeze.attached(model):
        logits = model(question, **cached(cache)).logits
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), **cached(cache)).logits
    return tokens


def test_a_budget_that_keeps_everything_reproduces_the_model_exactly(family):
    model = tiny_model(family)
    context, question = random_ids(60, seed=1), random_ids(5, seed=2)
    ctx = kvsqueeze.compress(model, None, context, kvsqueeze.RestoreKV(ratio=0.0, adapter=trained_like(model)))
    assert ctx.logical_length == 60 and ctx.cache.get_seq_length() == 60  # no restore tokens
    with torch.no_grad(), kvsqueeze.attached(model):
        expected = model(question, **cached(kvsqueeze.compress(model, None, context).cache.fork())).logits
        assert torch.equal(model(question, **cached(ctx.cache.fork())).logits, expected)


def test_the_restore_tokens_stay_and_kvzip_fills_the_rest_of_each_heads_budget(family):
    """Level "head": every head keeps 50 tokens of 100, the 8 restore tokens last, after KVzip's 42 best."""
    model, ids = tiny_model(family), random_ids(100, seed=3)
    adapter = trained_like(model)
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.RestoreKV(ratio=0.5, adapter=adapter, level="head"))
    kvzip = kvsqueeze.compress(model, None, ids, kvsqueeze.KVzip(budget=42, level="head"))
    full = kvsqueeze.compress(model, None, ids).cache
    restored = kvsqueeze.RestoreKV(ratio=0.5, adapter=adapter)
    restored.restore(model, full)  # the restore pass alone, on the whole context
    assert ctx.cache.get_seq_length() == 108 and ctx.logical_length == 108
    for layer, alone, whole in zip(ctx.cache.layers, kvzip.cache.layers, full.layers):
        if isinstance(layer, kvsqueeze.SlidingWindowLayer):
            continue
        assert layer.keys.shape[2] == 50
        torch.testing.assert_close(layer.keys[:, :, :42], alone.keys)
        torch.testing.assert_close(layer.keys[:, :, 42:], whole.keys[:, :, -8:])
        torch.testing.assert_close(layer.values[:, :, 42:], whole.values[:, :, -8:])


def test_pair_level_holds_the_budget_over_all_layers_and_heads(family):
    model = tiny_model(family)
    ctx = kvsqueeze.compress(model, None, random_ids(120, seed=4), kvsqueeze.RestoreKV(ratio=0.5,
                                                                                      adapter=trained_like(model)))
    layers = [layer for layer in ctx.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    kept = [layer.kept_per_head()[0] for layer in layers]
    assert sum(int(k.sum()) for k in kept) == 60 * sum(k.numel() for k in kept)  # restore tokens included
    assert min(int(h) for k in kept for h in k) >= 8
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert sum(layer.nbytes() for layer in layers) <= 0.5 * 1.25 * sum(layer.peak_bytes for layer in layers)


def test_the_adapter_changes_the_restore_pass_only():
    model, ids, probe = tiny_model(), random_ids(80), random_ids(12, seed=9)
    with torch.no_grad():
        before = model(probe).logits
    untrained, trained = RestoreAdapter.for_model(model), trained_like(model)
    caches = [kvsqueeze.compress(model, None, ids, kvsqueeze.RestoreKV(ratio=0.5, adapter=a, level="head")).cache
              for a in (untrained, trained)]
    plain = kvsqueeze.compress(model, None, ids).cache
    with torch.no_grad():
        assert torch.equal(model(probe).logits, before)  # no hook left behind
        with kvsqueeze.attached(model):
            model.base_model(inputs_embeds=untrained.embeddings[None], **cached(plain), use_cache=True)
    torch.testing.assert_close(caches[0].layers[1].keys[:, :, -8:], plain.layers[1].keys[:, :, -8:])  # B = 0
    assert not torch.allclose(caches[1].layers[1].keys[:, :, -8:], caches[0].layers[1].keys[:, :, -8:])


def test_generation_starts_after_the_restore_tokens():
    model = tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(80), kvsqueeze.RestoreKV(ratio=0.5, adapter=trained_like(model)))
    question = random_ids(5, seed=1)
    assert ctx.generate(question, max_new_tokens=6)[0].tolist() == greedy(model, ctx.cache.fork(), question, 6)


def test_a_batch_answers_as_each_context_alone():
    model = tiny_model()
    method = kvsqueeze.RestoreKV(ratio=0.5, adapter=trained_like(model))
    rows, question = [random_ids(80), random_ids(60, seed=3)], random_ids(5, seed=1)
    batch = kvsqueeze.compress(model, None, rows, method)
    answers = batch.generate(question, max_new_tokens=5)
    for b, row in enumerate(rows):
        alone = kvsqueeze.compress(model, None, row, method)
        assert answers[b].tolist() == alone.generate(question, max_new_tokens=5)[0].tolist()
        assert torch.equal(batch.cache.kept_per_head()[1][b], alone.cache.kept_per_head()[1][0])


def test_a_saved_context_answers_the_same(tmp_path):
    model = tiny_model()
    ctx = kvsqueeze.compress(model, None, random_ids(80), kvsqueeze.RestoreKV(ratio=0.5, adapter=trained_like(model)))
    ctx.save(tmp_path / "context.safetensors")
    loaded = kvsqueeze.CompressedContext.load(tmp_path / "context.safetensors", model)
    question = random_ids(5, seed=1)
    assert torch.equal(loaded.generate(question, max_new_tokens=5), ctx.generate(question, max_new_tokens=5))


def test_the_adapter_file_round_trips(tmp_path):
    model, ids = tiny_model(), random_ids(80)
    adapter, path = trained_like(model), tmp_path / "restorekv.safetensors"
    adapter.plus = True  # trained on KVzip+ scores
    adapter.save(path, model, {"steps": 3})
    loaded, settings = RestoreAdapter.load(path)
    assert settings["plus"] is True and settings["steps"] == 3 and loaded.plus
    assert (loaded.rank, loaded.alpha, loaded.n_tokens) == (16, 32.0, 8)
    assert adapter.tensors().keys() == loaded.tensors().keys()
    assert all(torch.equal(t, loaded.tensors()[name]) for name, t in adapter.tensors().items())
    from_file, in_memory = (kvsqueeze.RestoreKV(ratio=0.5, adapter=a, level="head") for a in (str(path), adapter))
    ctx, expected = (kvsqueeze.compress(model, None, ids, m) for m in (from_file, in_memory))
    assert from_file.plus and in_memory.plus and ctx.method.settings()["adapter"] == str(path)  # KVzip+ as trained
    for a, b in zip(ctx.cache.layers, expected.cache.layers):
        assert torch.equal(a.keys, b.keys)


def test_bad_adapters_and_budgets_get_clear_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="calibrate restorekv"):
        kvsqueeze.RestoreKV(ratio=0.5)
    with pytest.raises(FileNotFoundError, match="calibrate restorekv"):
        kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.RestoreKV(adapter=tmp_path / "none.safetensors"))
    other = tiny_model(hidden_size=32, head_dim=8)
    with pytest.raises(ValueError, match="another model"):
        kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.RestoreKV(adapter=RestoreAdapter.for_model(other)))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="calibrate restorekv"):
        kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.RestoreKV(adapter=damaged))
    qfilter = tmp_path / "qfilter.safetensors"
    save_calibration(qfilter, "qfilter", {"filters": torch.zeros(4, 2, 16)}, model)
    with pytest.raises(ValueError, match="not RestoreKV"):
        kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.RestoreKV(adapter=qfilter))
    with pytest.raises(ValueError, match="restore tokens take 8"):
        kvsqueeze.compress(model, None, random_ids(20), kvsqueeze.RestoreKV(ratio=0.75, adapter=trained_like(model)))


def test_trains_on_the_bundled_model_and_answers(bundled, tmp_path):
    model, tokenizer = bundled
    path = tmp_path / "restorekv.safetensors"
    adapter = train_restore(model, tokenizer, samples=1, tokens=200, steps=3, span=32, out=path, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # the model is unfrozen again
    loaded, settings = RestoreAdapter.load(path)
    assert settings["steps"] == 3 and len(loaded.names) == 30 * 7  # q, k, v, o, gate, up, down of 30 layers
    # every projection learned, except where the restore tokens' own outputs go only to their unused logits
    untrained = {name for name, b in zip(loaded.names, loaded.lora_b) if not bool(b.abs().sum() > 0)}
    assert untrained == {f"layers.29.{p}" for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                    "mlp.up_proj", "mlp.down_proj")}
    assert not torch.equal(loaded.embeddings, RestoreAdapter.for_model(model).embeddings)
    assert adapter.tensors().keys() == loaded.tensors().keys()
    assert all(torch.equal(t, loaded.tensors()[name]) for name, t in adapter.tensors().items())
    sample = needle_sample(tokenizer, 300, 0.5, seed=7)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.RestoreKV(ratio=0.5, adapter=str(path)))
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert ctx.stats.bytes_held <= 0.56 * ctx.stats.bytes_uncompressed
    assert isinstance(ctx.ask(sample.question, max_new_tokens=8), str)
