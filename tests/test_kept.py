"""kvsqueeze.kept.kept_positions: which context tokens each layer and KV head of a compressed cache holds."""

import pytest
import torch

import kvsqueeze
from kvsqueeze.kept import kept_positions

from conftest import build_method, random_ids, tiny_model


def held_counts(ctx, row=0) -> torch.Tensor:
    """[layers, kv_heads] real tokens held, as the cache reports them."""
    return torch.stack([heads[row] for heads in ctx.cache.kept_per_head()])


def key_norm_choice(model, ids, ratio, layers) -> torch.Tensor:
    """KNorm's choice in `layers`, computed here from the full cache: per head the keys of smallest norm."""
    full = kvsqueeze.compress(model, None, ids, None)
    chosen = []
    for index in layers:
        norms = full.cache.layers[index].keys[0].float().norm(dim=-1)  # [heads, tokens]
        n_keep = int(norms.shape[-1] * (1 - ratio))
        mask = torch.zeros_like(norms, dtype=torch.bool)
        mask.scatter_(-1, norms.argsort(dim=-1, stable=True)[:, :n_keep], True)
        chosen.append(mask)
    return torch.stack(chosen)


def test_streaming_llm_keeps_the_sinks_and_the_recent_tokens():
    model, ids = tiny_model(), random_ids(64)
    kept = kept_positions(kvsqueeze.compress(model, None, ids, kvsqueeze.StreamingLLM(ratio=0.5, n_sink=4)))
    expected = torch.zeros(64, dtype=torch.bool)
    expected[:4] = expected[-28:] = True
    assert kept.shape == (4, 2, 64)
    assert (kept == expected).all()


def test_knorm_keeps_the_smallest_key_norms_in_every_head(family):
    model, ids = tiny_model(family), random_ids(48, seed=1)
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.KNorm(ratio=0.5))
    kept = kept_positions(ctx)
    assert (kept.sum(-1) == held_counts(ctx)).all()
    compressible = ctx.stats.compressible_layers
    assert torch.equal(kept[compressible], key_norm_choice(model, ids, 0.5, compressible))
    if family == "gemma3":  # a sliding-window layer holds the last tokens of its window, untouched by the method
        sliding = next(i for i in range(4) if i not in compressible)
        window = ctx.cache.stored_lengths()[sliding]
        assert 0 < window < 48 and kept[sliding, :, -window:].all() and not kept[sliding, :, :-window].any()


def test_head_wise_budgets_are_found_per_head():
    model, ids = tiny_model(), random_ids(80, seed=2)
    ctx = kvsqueeze.compress(model, None, ids, build_method("headkv", 0.5, model))
    kept = kept_positions(ctx)
    counts = held_counts(ctx)
    assert len(set(counts.flatten().tolist())) > 1  # heads really keep different numbers of tokens
    assert (kept.sum(-1) == counts).all()  # every held token matched a distinct context token


def test_nothing_compressed_keeps_everything():
    model, ids = tiny_model(), random_ids(32)
    assert kept_positions(kvsqueeze.compress(model, None, ids, None)).all()


def test_a_batch_row_keeps_what_it_keeps_alone():
    model = tiny_model()
    rows = [random_ids(40, seed=3), random_ids(64, seed=4)]
    method = kvsqueeze.SnapKV(ratio=0.5, window_size=8)
    batch = kvsqueeze.compress(model, None, rows, method)
    for i, ids in enumerate(rows):
        alone = kept_positions(kvsqueeze.compress(model, None, ids, method))
        assert torch.equal(kept_positions(batch, row=i), alone)
    with pytest.raises(IndexError):
        kept_positions(batch, row=2)


@pytest.mark.parametrize("method", [kvsqueeze.KNorm(ratio=0.5), kvsqueeze.AdaKV(ratio=0.5), None])
def test_a_quantizer_does_not_change_what_is_found(family, method):
    """A quantizer rounds what it stores, not what the method evicts: the positions are those without it."""
    model, ids = tiny_model(family), random_ids(300, seed=5)
    exact = kept_positions(kvsqueeze.compress(model, None, ids, method))
    quantized = kvsqueeze.compress(model, None, ids, method, quantizer="kivi-2")
    assert quantized.stats.bytes_held < 0.6 * kvsqueeze.compress(model, None, ids, method).stats.bytes_held
    assert torch.equal(kept_positions(quantized), exact)


def test_merged_tokens_are_matched_to_their_nearest():
    """CAM merges evicted values into kept ones: each held token is then matched with the nearest full token."""
    model, ids = tiny_model(), random_ids(96, seed=5)
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.CAM(ratio=0.5))
    kept = kept_positions(ctx)
    assert (kept.sum(-1) == held_counts(ctx)).all()


def test_bundled_model_and_its_chat_template(bundled):
    """On the bundled model (30 layers x 3 KV heads), over the chat-templated context, for the demo's method."""
    model, tokenizer = bundled
    ctx = kvsqueeze.compress(model, tokenizer, "The lighthouse keeper's stew uses seven bay leaves. " * 12,
                             kvsqueeze.StreamingLLM(ratio=0.5))
    kept = kept_positions(ctx)
    assert kept.shape == (30, 3, ctx.logical_length)
    assert (kept.sum(-1) == held_counts(ctx)).all()
    assert kept[:, :, :4].all() and kept[:, :, -10:].all()


def test_an_uncompressed_reference_can_be_given():
    model, ids = tiny_model(), random_ids(40, seed=6)
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.KNorm(ratio=0.5))
    full = kvsqueeze.compress(model, None, ids, None)
    assert torch.equal(kept_positions(ctx, reference=full), kept_positions(ctx))
    with pytest.raises(ValueError, match="not the same context"):
        kept_positions(ctx, reference=kvsqueeze.compress(model, None, random_ids(40, seed=7), None))
