"""Compression while generating: a token budget, H2O, and a rolling StreamingLLM past the model's window."""

import pytest
import torch

import kvsqueeze
from conftest import forward_cache, output_cache, random_ids, tiny_model


def held_per_step(model):
    """Record, after every forward, the most tokens any (row, head) of any compressible layer holds."""
    record = []

    def hook(module, args, kwargs, output):
        cache = forward_cache(kwargs)
        record.append(max(int(layer.kept_per_head().max()) for layer in cache.layers
                          if not isinstance(layer, kvsqueeze.SlidingWindowLayer)))

    return record, model.base_model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("prefill", [None, "snapkv", "adakv"])
def test_a_decode_budget_is_never_exceeded_by_more_than_the_interval(prefill):
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(400), prefill and kvsqueeze.method(prefill, ratio=0.5))
    record, handle = held_per_step(model)
    try:
        tokens = ctx.generate(random_ids(6, seed=1), max_new_tokens=80, min_new_tokens=80,
                              decode_method=kvsqueeze.DecodingBudget(budget=64, interval=8))
    finally:
        handle.remove()
    assert tokens.shape == (1, 80)
    decode_steps = record[1:]  # the first forward is the question, which the decode budget leaves alone
    assert max(decode_steps) <= 64 + 8 and decode_steps[-1] <= 64 + 8
    assert min(decode_steps) >= 64  # it keeps the budget, not less


def test_the_decode_budget_of_512_tokens_holds_on_a_long_context():
    model = tiny_model("qwen3", max_position_embeddings=2048)
    ctx = kvsqueeze.compress(model, None, random_ids(1200))
    record, handle = held_per_step(model)
    try:
        ctx.generate(random_ids(3, seed=2), max_new_tokens=40, min_new_tokens=40,
                     decode_method=kvsqueeze.DecodingBudget(budget=512, interval=16))
    finally:
        handle.remove()
    assert max(record[1:]) <= 512 + 16


def test_h2o_keeps_heavy_hitters_and_recent_tokens_within_its_budget():
    model = tiny_model("llama")
    method = kvsqueeze.H2O(budget=50)
    with method.apply(model):
        out = model.generate(random_ids(120), attention_mask=torch.ones(1, 120, dtype=torch.long), max_new_tokens=30,
                             min_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    cache = output_cache(out)
    assert cache.get_seq_length() == 149
    assert all(layer.stored == 50 for layer in cache.layers)
    accumulated = cache.layers[0].recall("h2o")
    assert accumulated.shape == (1, 2, 50) and bool((accumulated > 0).all())


def test_rolling_streaming_llm_generates_past_the_window_with_flat_memory():
    model = tiny_model("llama", max_position_embeddings=256)
    positions = []
    record, record_handle = held_per_step(model)
    method = kvsqueeze.RollingStreamingLLM(window=64, n_sink=4, interval=16)
    try:
        with method.apply(model):  # the position hook comes after the method's: it sees the positions used
            handle = model.model.register_forward_pre_hook(
                lambda m, args, kwargs: positions.append(int(kwargs["position_ids"].max())), with_kwargs=True)
            out = model.generate(random_ids(100), attention_mask=torch.ones(1, 100, dtype=torch.long),
                                 max_new_tokens=520, min_new_tokens=520, do_sample=False)
    finally:
        handle.remove()
        record_handle.remove()
    assert out.shape[1] == 620  # more than twice the model's window of 256
    assert positions[0] == 99  # the prompt, then every step at a position inside the cache
    assert max(positions[1:]) < 64 + 16 and max(record[1:]) <= 64 + 16


def test_rolling_streaming_llm_rerotation_equals_a_fresh_prefill_at_cache_positions():
    """After a roll, the kept keys are exactly those a model would have computed at their new positions."""
    model = tiny_model("llama")
    ids = random_ids(40)
    method = kvsqueeze.RollingStreamingLLM(window=20, n_sink=4, interval=4)
    ctx = kvsqueeze.compress(model, None, ids, method)
    kept_ids = torch.cat([ids[:, :4], ids[:, -16:]], 1)
    reference = kvsqueeze.compress(model, None, kept_ids)
    layer, expected = ctx.cache.layers[0], reference.cache.layers[0]
    assert layer.get_seq_length() == layer.stored == 20
    # layer 0's keys depend only on each token and its position: re-rotation must give the same keys
    assert torch.allclose(layer.keys, expected.keys, atol=1e-5)


def test_a_rolled_context_answers_without_reading_its_text_again():
    """generate() feeds only the question after a rolled cache (whose positions restart): the context's own tokens,
    already in the cache, are not read a second time."""
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(40), kvsqueeze.RollingStreamingLLM(window=20, n_sink=4, interval=4))
    assert ctx.cache.get_seq_length() == 20 < ctx.logical_length
    fed = []
    handle = model.model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                                   with_kwargs=True)
    try:
        new = ctx.generate(random_ids(5, seed=1), max_new_tokens=3, min_new_tokens=3)
    finally:
        handle.remove()
    assert new.shape == (1, 3) and fed == [5, 1, 1]


def test_decode_methods_through_ask(bundled):
    model, tokenizer = bundled
    ctx = kvsqueeze.compress(model, tokenizer, "The sky is blue. " * 60, kvsqueeze.SnapKV(ratio=0.5))
    answer = ctx.ask("What colour is the sky?", max_new_tokens=40,
                     decode_method=kvsqueeze.DecodingBudget(scorer="snapkv", budget=100, interval=8))
    assert isinstance(answer, str) and answer
