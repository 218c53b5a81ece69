"""Masks and positions on a compressed cache: each layer attends to its own stored tokens, positions continue."""

import pytest
import torch

import kvsqueeze
from conftest import cached, random_ids, tiny_model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma3"])
def test_a_question_at_once_equals_the_question_token_by_token(family, attn):
    """Layers of different lengths (PyramidKV) each get their own causal mask for a multi-token question.

    A single-token step needs no mask, so feeding the question one token at a time is the reference.
    """
    model = tiny_model(family, attn=attn, num_hidden_layers=6,
                       **({"layer_types": ["sliding_attention", "full_attention"] * 3} if family == "gemma3" else {}))
    ctx = kvsqueeze.compress(model, None, random_ids(90), kvsqueeze.PyramidKV(ratio=0.6, window_size=4))
    lengths = [layer.stored for layer in ctx.cache.layers if isinstance(layer, kvsqueeze.EvictingLayer)]
    assert len(set(lengths)) > 1, "the layers must hold different numbers of tokens"
    question = random_ids(6, seed=5)
    with torch.no_grad(), kvsqueeze.attached(model):
        at_once = model(question, **cached(ctx.cache.fork())).logits
        cache = ctx.cache.fork()
        one_by_one = torch.cat([model(question[:, i:i + 1], **cached(cache)).logits for i in range(6)], 1)
    assert torch.allclose(at_once, one_by_one, atol=1e-5)


def test_positions_continue_from_the_logical_length():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(50), kvsqueeze.KNorm(ratio=0.8))
    assert ctx.cache.layers[0].stored == 10 and ctx.cache.get_seq_length() == 50
    seen = []
    handle = model.model.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["position_ids"].flatten().tolist()), with_kwargs=True)
    try:
        ctx.generate(random_ids(3, seed=1), max_new_tokens=3)
    finally:
        handle.remove()
    assert seen == [[50, 51, 52], [53], [54]]


def test_sampling_streaming_stop_strings_and_beams_run_on_a_compressed_context(bundled):
    from transformers import TextIteratorStreamer
    model, tokenizer = bundled
    ctx = kvsqueeze.compress(model, tokenizer, "The cat sat on the mat. " * 40, kvsqueeze.SnapKV(ratio=0.5))
    torch.manual_seed(0)
    sampled = ctx.ask("Where did the cat sit?", do_sample=True, temperature=0.8, top_p=0.9, max_new_tokens=12)
    assert isinstance(sampled, str) and sampled
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    ctx.ask("Where did the cat sit?", streamer=streamer, max_new_tokens=8)
    assert "".join(streamer)
    stopped = ctx.ask("Where did the cat sit?", stop_strings=["mat"], tokenizer=tokenizer, max_new_tokens=30)
    assert stopped.endswith("mat") or "mat" not in stopped
    beams = ctx.ask("Where did the cat sit?", num_beams=3, max_new_tokens=8)
    several = ctx.ask("Where did the cat sit?", do_sample=True, num_return_sequences=2, max_new_tokens=8)
    assert isinstance(beams, str) and len(several) == 2 and ctx.cache.layers[0].keys.shape[0] == 1


@pytest.mark.compat
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_kvsqueeze_attention_wraps_without_changing_anything_and_is_given_back(attn):
    model = tiny_model("llama", attn=attn)
    ids = random_ids(30)
    with torch.no_grad():
        plain = model(ids).logits
        with kvsqueeze.attached(model):
            assert model.config._attn_implementation == f"kvsqueeze_{attn}"
            wrapped = model(ids).logits
            with kvsqueeze.KNorm(ratio=0.5).apply(model):  # attachments nest: the outer one still holds
                pass
            assert model.config._attn_implementation == f"kvsqueeze_{attn}"
    assert torch.equal(plain, wrapped)
    assert model.config._attn_implementation == attn and not model.model._forward_pre_hooks
    ctx = kvsqueeze.compress(model, None, ids, kvsqueeze.SnapKV(ratio=0.5))
    ctx.generate(random_ids(3, seed=1), max_new_tokens=2)
    assert model.config._attn_implementation == attn  # left as it was found
    assert all(not m._forward_hooks for m in model.modules()) and not model.model._forward_pre_hooks


def test_a_compressed_cache_read_without_kvsqueeze_is_refused():
    model = tiny_model("llama")
    ctx = kvsqueeze.compress(model, None, random_ids(30), kvsqueeze.AdaKV(ratio=0.5))
    with torch.no_grad(), pytest.raises(kvsqueeze.cache.UnreadCacheError, match="attached"):
        model(random_ids(3), **cached(ctx.cache.fork()))


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_attention_received_is_the_causal_attention_summed_over_queries(chunk):
    from kvsqueeze.methods.h2o import attention_received

    torch.manual_seed(0)
    batch, kv_heads, group, n, stored, dim = 2, 2, 3, 5, 9, 4
    query, keys = torch.randn(batch, kv_heads * group, n, dim), torch.randn(batch, kv_heads, stored, dim)
    real = torch.ones(batch, kv_heads, stored, dtype=torch.bool)
    real[1, :, :3] = False  # row 1 is left-padded by three tokens
    query_real = torch.ones(batch, n)
    query_real[1, 0] = 0
    logits = query @ keys.repeat_interleave(group, 1).transpose(-1, -2) * 0.5
    position = torch.arange(n) + stored - n
    hidden = (torch.arange(stored)[None, :] > position[:, None]) | ~real.repeat_interleave(group, 1)[:, :, None, :]
    weights = logits.masked_fill(hidden, float("-inf")).softmax(-1).nan_to_num(0.0) * query_real[:, None, :, None]
    expected = weights.sum(2).view(batch, kv_heads, group, stored).sum(2)
    assert torch.allclose(attention_received(query, keys, real, 0.5, query_real, chunk=chunk), expected, atol=1e-6)
    no_padding = query @ keys.repeat_interleave(group, 1).transpose(-1, -2) * 0.5
    plain = no_padding.masked_fill(torch.arange(stored)[None, :] > position[:, None], float("-inf")).softmax(-1)
    assert torch.allclose(attention_received(query, keys, None, 0.5, chunk=chunk),
                          plain.sum(2).view(batch, kv_heads, group, stored).sum(2), atol=1e-6)
