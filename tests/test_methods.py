"""Every method on tiny models of every family: ratio 0 is exact, compression really shrinks the cache."""

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze import compress
from conftest import RATIO_METHODS, build_method, cached, head_table, random_ids, tiny_model

ALL = sorted(kvsqueeze.available())


def attn_for(name):
    return "eager" if name == "observed_attention" else "sdpa"


def reference(model, context, question, new_tokens=6):
    """The plain model, no kvsqueeze: context prefilled into a DynamicCache, then the question."""
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(context, **cached(cache))
        logits = model(question, **cached(cache)).logits
        ids = torch.cat([context, question], 1)
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return logits, tokens[0, ids.shape[1]:]


def compressed(model, context, question, method, new_tokens=6):
    ctx = compress(model, None, context, method)
    with torch.no_grad(), kvsqueeze.attached(model):
        logits = model(question, **cached(ctx.cache.fork())).logits
    return ctx, logits, ctx.generate(question, max_new_tokens=new_tokens)[0]


@pytest.mark.compat
@pytest.mark.parametrize("name", ALL)
def test_ratio_zero_reproduces_the_model_exactly(family, name):
    model = tiny_model(family, attn=attn_for(name))
    if family == "gemma3" and name == "rolling_streaming_llm":  # positions in the cache vs sliding windows
        with pytest.raises(ValueError, match="all full attention"):
            compress(model, None, random_ids(20), build_method(name, 0.0, model))
        return
    context, question = random_ids(80, seed=1), random_ids(7, seed=2)
    expected_logits, expected_tokens = reference(model, context, question)
    ctx, logits, tokens = compressed(model, context, question, build_method(name, 0.0, model))
    assert torch.equal(logits, expected_logits)
    assert torch.equal(tokens, expected_tokens)
    assert ctx.stats.compression_ratio == 0


@pytest.mark.compat
@pytest.mark.parametrize("name", RATIO_METHODS)
def test_half_the_cache_is_really_freed(family, name):
    model = tiny_model(family, attn=attn_for(name))
    context, question = random_ids(120, seed=3), random_ids(5, seed=4)
    ctx, logits, tokens = compressed(model, context, question, build_method(name, 0.5, model))
    compressed_layers = [layer for layer in ctx.cache.layers if not isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    assert compressed_layers, "every family has full-attention layers"
    kept = sum(int(layer.kept_per_head().sum()) for layer in compressed_layers)
    heads = sum(layer.kept_per_head().numel() for layer in compressed_layers)
    # 60 tokens per head on average (pyramid and head-adaptive budgets round per layer or head)
    assert kept / heads == pytest.approx(60, abs=1)
    assert ctx.stats.context_tokens == 120
    for layer in compressed_layers:  # the context, and any tokens a method added after it (RestoreKV's)
        assert layer.get_seq_length() == ctx.logical_length >= 120
    held = sum(layer.nbytes() for layer in compressed_layers)
    peak = sum(layer.peak_bytes for layer in compressed_layers)
    # ragged layers add under a page per head (16 tokens at least) and their index: a lot for 60 tokens of dim 16
    assert held <= 0.5 * peak * 1.25
    assert torch.isfinite(logits).all()
    assert tokens.shape[0] == 6


@pytest.mark.parametrize("name", RATIO_METHODS)
def test_budget_in_tokens(name):
    model = tiny_model("llama", attn=attn_for(name))
    calibrated = {"headkv": {"head_scores": head_table(model)},
                  "restorekv": {"adapter": kvsqueeze.methods.restorekv.RestoreAdapter.for_model(model)}}
    method = kvsqueeze.available()[name](budget=40, **calibrated.get(name, {}))
    ctx = compress(model, None, random_ids(100), method)
    kept = [layer.kept_per_head().float().mean().item() for layer in ctx.cache.layers]
    assert sum(kept) / len(kept) == pytest.approx(40, abs=1)


def test_sliding_window_layers_are_left_to_the_model():
    model = tiny_model("gemma3")
    ctx = compress(model, None, random_ids(100), kvsqueeze.SnapKV(ratio=0.5))
    sliding = [layer for layer in ctx.cache.layers if isinstance(layer, kvsqueeze.SlidingWindowLayer)]
    assert sliding and all(layer.stored == 15 and layer.get_seq_length() == 100 for layer in sliding)
    assert [layer.stored for layer in ctx.cache.layers if isinstance(layer, kvsqueeze.EvictingLayer)] == [50, 50]


def test_observed_attention_says_it_needs_eager_attention():
    model = tiny_model("llama", attn="sdpa")
    with pytest.raises(kvsqueeze.MissingAttentionWeights, match="eager"):
        compress(model, None, random_ids(50), kvsqueeze.ObservedAttention(ratio=0.5))


def test_every_method_is_registered_and_summarised():
    for name, cls in kvsqueeze.available().items():
        assert cls.name == name and getattr(kvsqueeze, cls.__name__) is cls
        assert cls.summary() and cls.summary().startswith("Keeps")
        assert "arXiv" in cls.__doc__ or name in ("random", "decoding_budget", "composed", "per_layer_compression")  # a baseline, wrappers
