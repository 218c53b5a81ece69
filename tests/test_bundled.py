"""Integration on the bundled SmolLM2-135M-Instruct: real language, real memory."""

import re

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze import cli
from kvsqueeze.evaluation.needle import needle_sample
from conftest import build_method, cached


@pytest.mark.parametrize("name", sorted(kvsqueeze.available()))
def test_ratio_zero_reproduces_the_bundled_model_exactly(bundled, name):
    model, tokenizer = bundled
    if name == "observed_attention":
        model.set_attn_implementation("eager")
    try:
        sample = needle_sample(tokenizer, 400, 0.5, seed=3)
        ctx = kvsqueeze.compress(model, tokenizer, sample.context, build_method(name, 0.0, model))
        question = ctx.prompt.question_ids(sample.question)
        with torch.no_grad():
            with kvsqueeze.attached(model):
                logits = model(question, **cached(ctx.cache.fork())).logits
            cache = DynamicCache(config=model.config)
            model(ctx.context_ids, **cached(cache))
            expected = model(question, **cached(cache)).logits
        assert torch.equal(logits, expected)
        ids = torch.cat([ctx.context_ids, question], 1)
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert torch.equal(ctx.generate(question, max_new_tokens=12), plain[:, ids.shape[1]:])
    finally:
        model.set_attn_implementation("sdpa")


@pytest.fixture(scope="module")
def haystacks(bundled):
    tokenizer = bundled[1]
    return {depth: needle_sample(tokenizer, 3000, depth, seed=seed) for depth, seed in [(0.1, 11), (0.5, 12), (0.8, 13)]}


def test_the_full_cache_finds_the_needle(bundled, haystacks):
    model, tokenizer = bundled
    sample = haystacks[0.5]
    assert sample.correct(kvsqueeze.compress(model, tokenizer, sample.context).ask(sample.question, max_new_tokens=24))


def test_streaming_llm_at_half_keeps_recent_needles_and_really_drops_old_ones(bundled, haystacks):
    """StreamingLLM at ratio 0.5 keeps the sinks and the newest half of the context."""
    model, tokenizer = bundled
    recent, old = haystacks[0.8], haystacks[0.1]
    method = kvsqueeze.StreamingLLM(ratio=0.5)
    ctx = kvsqueeze.compress(model, tokenizer, recent.context, method)
    assert ctx.stats.bytes_held <= 0.5 * ctx.stats.bytes_uncompressed
    assert recent.correct(ctx.ask(recent.question, max_new_tokens=24))
    assert not old.correct(kvsqueeze.compress(model, tokenizer, old.context, method).ask(old.question,
                                                                                         max_new_tokens=24))


def test_the_demo_finds_the_fact_in_half_the_memory(capsys):
    """The README's main command: both answers state the fact; the compressed cache holds <= 55% of the bytes."""
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "seven" not in cli.DEMO_QUESTION.lower()
    assert len(re.findall(r"\b(seven|7)\b", out.lower())) >= 2, out
    held = next(line for line in out.splitlines() if line.startswith("cache held"))
    assert int(re.search(r"\((\d+)%\)", held).group(1)) <= 55, held


def test_cli_ask_and_methods(tmp_path, capsys):
    document = tmp_path / "doc.txt"
    document.write_text("The orchard behind the mill grows pears. The miller's dog is called Biscuit. " * 20)
    assert cli.main(["ask", str(document), "-q", "What is the miller's dog called?", "-m", "knorm", "-r", "0.25",
                     "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "full cache" in out and "KNorm(ratio=0.25)" in out and "cache held" in out and "(75%)" in out
    assert cli.main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in kvsqueeze.available())
    assert cli.main(["ask", str(document), "-q", "x", "-m", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli.main(["ask", str(document), "-q", "x", "-r", "1.2"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_adakv_frees_what_it_removes(bundled, ratio):
    """Head-wise budgets really free memory: at most (1 - ratio) of the bytes, plus 3% (pages and index)."""
    from importlib.resources import files
    model, tokenizer = bundled
    document = files("kvsqueeze").joinpath("data/document.txt").read_text()
    ctx = kvsqueeze.compress(model, tokenizer, document, kvsqueeze.AdaKV(ratio=ratio))
    assert all(isinstance(layer, kvsqueeze.RaggedLayer) for layer in ctx.cache.layers)
    held = sum(t.nbytes for layer in ctx.cache.layers for t in (layer.pages_k, layer.pages_v, layer.page_segment,
                                                                  layer.page_fill, layer.lengths, layer.tail_k,
                                                                  layer.tail_v))
    assert held == ctx.stats.bytes_held
    assert ctx.stats.bytes_held <= (1 - ratio + 0.03) * ctx.stats.bytes_uncompressed
    per_head = torch.cat([layer.kept_per_head().flatten() for layer in ctx.cache.layers])
    assert per_head.min() < per_head.max()  # really head-adaptive
    assert ctx.ask("What is the town called?", max_new_tokens=8)


def test_think_at_half_holds_half_the_key_bytes(bundled):
    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 1500, 0.5, seed=4)
    full = kvsqueeze.compress(model, tokenizer, sample.context)
    thin = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.ThinK(key_channel_ratio=0.5))
    full_keys = sum(layer.keys.nbytes for layer in full.cache.layers)
    thin_keys = sum(layer.pages_k.nbytes for layer in thin.cache.layers)
    assert thin_keys <= 0.5 * full_keys * 1.02
    assert thin.nbytes() <= 0.77 * full.nbytes()  # values are all kept: 3/4 of the bytes, plus pages and index
    assert thin.ask(sample.question, max_new_tokens=24)


@pytest.mark.parametrize("name", sorted(kvsqueeze.available()))
def test_every_method_runs_end_to_end_on_the_bundled_model(bundled, name):
    model, tokenizer = bundled
    sample = needle_sample(tokenizer, 600, 0.3, seed=5)
    if name == "observed_attention":
        model.set_attn_implementation("eager")
    try:
        ctx = kvsqueeze.compress(model, tokenizer, sample.context, build_method(name, 0.5, model))
        answers = ctx.ask_many([sample.question, "What is this text about?"], max_new_tokens=10)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert ctx.stats.bytes_held <= ctx.stats.bytes_uncompressed


def test_calibration_routines_on_the_bundled_model(bundled, tmp_path):
    from kvsqueeze.calibration import duo_attention_gates, retrieval_head_scores
    from kvsqueeze.head_scores import save_head_scores
    model, tokenizer = bundled
    scores = retrieval_head_scores(model, tokenizer, samples=2, lengths=(500,), progress=False)
    assert scores.shape == (30, 3) and scores.max() > 0 and (scores >= 0).all()
    gates = duo_attention_gates(model, tokenizer, steps=2, tokens=300, progress=False)
    assert gates.shape == (30, 3) and ((gates >= 0) & (gates <= 1)).all() and gates.min() < 1
    assert all(p.requires_grad for p in model.parameters()) and model.config._attn_implementation.endswith("sdpa")
    path = tmp_path / "heads.json"
    save_head_scores(path, scores, model, "headkv")
    sample = needle_sample(tokenizer, 800, 0.5, seed=6)
    ctx = kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.HeadKV(ratio=0.5, head_scores=path))
    assert ctx.stats.compression_ratio == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="headkv scores, not duo_attention"):
        kvsqueeze.compress(model, tokenizer, sample.context, kvsqueeze.DuoAttention(head_patterns=path))
