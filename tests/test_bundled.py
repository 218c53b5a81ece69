"""Integration on the bundled SmolLM2-135M-Instruct: real language, real memory."""

import re

import pytest
import torch
from transformers import DynamicCache

import kvsqueeze
from kvsqueeze import attention, cli
from kvsqueeze.evaluation.needle import needle_sample
from conftest import build_method


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
            logits = model(question, past_key_values=ctx.cache.fork()).logits
            attention.uninstall(model)
            cache = DynamicCache(config=model.config)
            model(ctx.context_ids, past_key_values=cache)
            expected = model(question, past_key_values=cache).logits
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
