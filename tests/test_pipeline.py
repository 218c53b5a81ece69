"""compress / ask / ask_many / save / load on the bundled model, the transformers pipeline, and bad input."""

import pytest
import torch
import transformers

import kvsqueeze
from kvsqueeze.models import attention_modules
from conftest import cached, output_cache, random_ids, tiny_model

STORY = ("Maya keeps her bicycle in the blue shed behind the bakery. Every Tuesday she rides to the lake. "
         "Her brother Tom prefers to walk, and he owns a grey cat named Pebble. ") * 12


@pytest.fixture(scope="module")
def story(bundled):
    model, tokenizer = bundled
    return kvsqueeze.compress(model, tokenizer, STORY, kvsqueeze.SnapKV(ratio=0.5))


def test_only_the_context_is_compressed(bundled, story):
    model, tokenizer = bundled
    prompt = kvsqueeze.prompt.Prompt.for_tokenizer(tokenizer)
    assert prompt.prefix.startswith("<|im_start|>system") and prompt.suffix.endswith("<|im_start|>assistant\n")
    assert story.logical_length == prompt.context_ids(STORY).shape[1] == story.cache.get_seq_length()
    assert story.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    assert story.stats.bytes_held == story.cache.nbytes() == pytest.approx(story.stats.bytes_uncompressed / 2, rel=0.01)


def test_ask_many_equals_asking_each_question_on_a_fresh_context(bundled, story):
    model, tokenizer = bundled
    questions = ["Where does Maya keep her bicycle?", "What is the name of Tom's cat?", "When does Maya ride?"]
    together = story.ask_many(questions, max_new_tokens=16)
    alone = [kvsqueeze.compress(model, tokenizer, STORY, kvsqueeze.SnapKV(ratio=0.5)).ask(q, max_new_tokens=16)
             for q in questions]
    assert together == alone


def test_save_and_load_give_the_same_answers(bundled, story, tmp_path):
    model, tokenizer = bundled
    path = tmp_path / "story.safetensors"
    story.save(path)
    loaded = kvsqueeze.CompressedContext.load(path, model, tokenizer)
    assert loaded.stats == story.stats and loaded.nbytes() == story.nbytes()
    question = "What is the name of Tom's cat?"
    assert loaded.ask(question, max_new_tokens=12) == story.ask(question, max_new_tokens=12)


def test_loading_onto_another_model_is_refused(story, tmp_path):
    path = tmp_path / "story.safetensors"
    story.save(path)
    with pytest.raises(kvsqueeze.ModelMismatchError, match="another model"):
        kvsqueeze.CompressedContext.load(path, tiny_model())


def test_corrupt_or_foreign_files_are_refused(bundled, story, tmp_path):
    model, tokenizer = bundled
    path = tmp_path / "story.safetensors"
    story.save(path)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:5000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(foreign))
    for bad in (truncated, garbage, foreign, tmp_path / "missing.safetensors"):
        with pytest.raises(kvsqueeze.CorruptContextError):
            kvsqueeze.CompressedContext.load(bad, model, tokenizer)


def test_the_transformers_pipeline_task(bundled):
    model, tokenizer = bundled
    pipe = transformers.pipeline("kvsqueeze-text-generation", model=model, tokenizer=tokenizer)
    out = pipe(STORY, question="What is the name of Tom's cat?", method=kvsqueeze.KNorm(ratio=0.25),
               max_new_tokens=12)
    assert out["answer"] and out["stats"].compression_ratio == pytest.approx(0.25, abs=0.01)
    many = pipe(STORY, questions=["Where does Maya keep her bicycle?", "Who prefers to walk?"], max_new_tokens=12)
    assert len(many["answers"]) == 2


@pytest.mark.compat
def test_hooks_are_removed_and_apply_works_around_generate():
    model = tiny_model()
    method = kvsqueeze.KNorm(ratio=0.5)
    ids = random_ids(40)
    with method.apply(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    assert isinstance(cache, kvsqueeze.SqueezeCache)
    assert cache.get_seq_length() == 42 and cache.layers[0].stored == 20 + 2  # compressed at prefill, then decoding
    assert all(not m._forward_hooks for m in attention_modules(model)) and not model.model._forward_pre_hooks
    with method.apply(model):
        out = model(ids, use_cache=True)
    assert output_cache(out).layers[0].stored == 20


def test_l2_compress_has_the_papers_semantics():
    model = tiny_model()
    with torch.no_grad():
        out = model(random_ids(50), use_cache=True)
    cache = kvsqueeze.l2_compress(output_cache(out), keep_ratio=0.3, prune_after=40, skip_layers=[0], model=model)
    assert cache.stored_lengths() == [50, 15, 15, 15] and cache.get_seq_length() == 50
    norms = output_cache(out).layers[1].keys.norm(dim=-1)
    kept = cache.layers[1].keys.norm(dim=-1)
    assert torch.allclose(kept.sort(-1).values, norms.sort(-1).values[..., :15])
    assert kvsqueeze.l2_compress(output_cache(out), keep_ratio=0.3, prune_after=51).stored_lengths() == [50] * 4
    with torch.no_grad():  # the compressed cache is used as is for the next forward
        assert model(random_ids(3), **cached(cache)).logits.shape == (1, 3, 256)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="keep_ratio"):
            kvsqueeze.l2_compress(output_cache(out), keep_ratio=bad)


def test_bad_input_gets_a_clear_error():
    model = tiny_model()
    with pytest.raises(kvsqueeze.UnknownMethodError, match="unknown method 'snapkvv'.*snapkv"):
        kvsqueeze.method("snapkvv")
    with pytest.raises(ValueError, match=r"ratio .* \[0, 1\)"):
        kvsqueeze.SnapKV(ratio=1.0)
    with pytest.raises(ValueError, match="budget"):
        kvsqueeze.KNorm(budget=0)
    with pytest.raises(kvsqueeze.ContextTooLongError, match="600 tokens.*window of 512"):
        kvsqueeze.compress(model, None, random_ids(600), kvsqueeze.KNorm())
    with pytest.raises(kvsqueeze.UnsupportedModelError, match="transformers models; got Linear"):
        kvsqueeze.compress(torch.nn.Linear(3, 3), None, random_ids(5), kvsqueeze.KNorm())
    mamba = transformers.AutoModelForCausalLM.from_config(transformers.MambaConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, state_size=4))
    with pytest.raises(kvsqueeze.UnsupportedModelError, match="no attention modules"):
        kvsqueeze.compress(mamba, None, random_ids(5), kvsqueeze.KNorm())
    with pytest.raises(ValueError, match="empty"):
        kvsqueeze.compress(model, None, torch.zeros(1, 0, dtype=torch.long))
