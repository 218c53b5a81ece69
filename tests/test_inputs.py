"""Every public entry checks its input: a clear, documented error, or a correct result; never a raw one."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kvsqueeze
from conftest import random_ids, tiny_model

MODEL = tiny_model()
# what kvsqueeze documents that it raises for bad input
DOCUMENTED = (ValueError, TypeError, kvsqueeze.UnknownMethodError, kvsqueeze.ContextTooLongError,
              kvsqueeze.CorruptContextError, kvsqueeze.ModelMismatchError)


def test_a_batch_of_ids_is_a_batch_never_flattened():
    ids = torch.cat([random_ids(20, seed=1), random_ids(20, seed=2)])
    batch = kvsqueeze.compress(MODEL, None, ids, kvsqueeze.KNorm(ratio=0.5))
    assert batch.batch_size == 2 and batch.logical_length == 20
    alone = kvsqueeze.compress(MODEL, None, ids[1], kvsqueeze.KNorm(ratio=0.5))
    question = random_ids(3, seed=3)
    assert torch.equal(batch.generate(question, max_new_tokens=4)[1], alone.generate(question, max_new_tokens=4)[0])


def test_a_method_by_instance_name_or_class():
    ids = random_ids(30)
    kept = [kvsqueeze.compress(MODEL, None, ids, m).cache.kept_per_head()
            for m in (kvsqueeze.SnapKV(), "snapkv", "SnapKV", "snap-kv", kvsqueeze.SnapKV)]
    assert all(all(torch.equal(a, b) for a, b in zip(kept[0], other)) for other in kept[1:])
    with pytest.raises(TypeError, match="a registry name"):
        kvsqueeze.compress(MODEL, None, ids, 0.5)


def test_unknown_names_get_the_closest_ones():
    with pytest.raises(kvsqueeze.UnknownMethodError, match="did you mean 'snapkv'"):
        kvsqueeze.method("snapvk")
    assert kvsqueeze.method("Streaming-LLM").name == "streaming_llm"


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[5, 300, 7]]), r"token ids must be in \[0, 256\)"),
    (torch.tensor([[5, -1, 7]]), r"token ids must be in \[0, 256\)"),
    (torch.tensor([[[1, 2]]]), "shape"),
    (torch.tensor([[1.5, 2.0]]), "integers"),
    ([], "empty"),
])
def test_bad_ids_are_refused_clearly(ids, message):
    with pytest.raises((ValueError, TypeError), match=message):
        kvsqueeze.compress(MODEL, None, ids)


def test_empty_texts_and_questions(bundled):
    model, tokenizer = bundled
    with pytest.raises(ValueError, match="empty"):
        kvsqueeze.compress(model, tokenizer, "   \n")
    ctx = kvsqueeze.compress(model, tokenizer, "The cat sat on the mat.")
    for question in ("", "   ", [], [""]):
        with pytest.raises(ValueError, match="non-empty text"):
            ctx.ask(question)


contexts = st.one_of(
    st.text(max_size=5), st.integers(), st.floats(), st.none(),
    st.lists(st.integers(min_value=-5, max_value=300), max_size=6),
    st.lists(st.lists(st.integers(min_value=0, max_value=255), max_size=4), max_size=3),
    st.builds(lambda n, v: torch.randint(-2, v, (n,)), st.integers(0, 5), st.integers(1, 400)),
    st.builds(lambda s: torch.zeros(s, dtype=torch.long), st.lists(st.integers(0, 3), max_size=3)),
)
methods = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["knorm", "snapkv", "think", "Ada-KV"]),
                    st.integers(), st.sampled_from([kvsqueeze.KNorm, kvsqueeze.TOVA, object]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contexts, methods)
def test_compress_accepts_only_what_it_documents(context, method):
    try:
        ctx = kvsqueeze.compress(MODEL, None, context, method)
    except DOCUMENTED:
        return
    assert ctx.logical_length >= 1 and ctx.stats.context_tokens >= 1
    assert ctx.generate(random_ids(2, seed=5), max_new_tokens=2).shape == (ctx.batch_size, 2)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=3)),
       st.dictionaries(st.sampled_from(["ratio", "budget", "window_size", "bogus"]),
                       st.one_of(st.floats(allow_nan=True), st.integers(-3, 3000), st.text(max_size=3)), max_size=2))
def test_method_accepts_only_what_it_documents(name, kwargs):
    try:
        built = kvsqueeze.method(name, **kwargs)
    except DOCUMENTED:
        return
    assert isinstance(built, kvsqueeze.Method)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300), st.integers(0, 10_000))
def test_load_accepts_only_valid_files(tmp_path_factory, junk, cut):
    path = tmp_path_factory.mktemp("saved") / "ctx.safetensors"
    kvsqueeze.compress(MODEL, None, random_ids(20), kvsqueeze.KNorm(ratio=0.5)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] + junk + data[cut + len(junk):] if junk else data[:cut])
    try:
        loaded = kvsqueeze.CompressedContext.load(path, MODEL)
    except DOCUMENTED:
        return
    assert loaded.logical_length == 20  # what survived is exactly what was saved


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3), st.integers(), st.none()))
def test_ask_accepts_only_what_it_documents(question):
    ctx = ASKED
    try:
        answer = ctx.ask(question, max_new_tokens=2)
    except DOCUMENTED:
        return
    assert isinstance(answer, (str, list))


class _Tokenizer:
    """A character tokenizer (ids 3..): enough for `ask` on a tiny model, no download."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True, return_tensors="pt"):
        ids = [3 + (ord(c) % 200) for c in text]
        return type("Encoded", (), {"input_ids": torch.tensor([ids], dtype=torch.long).reshape(1, -1)})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + int(i) % 26) for i in ids)


ASKED = kvsqueeze.compress(MODEL, _Tokenizer(), "a small context", kvsqueeze.KNorm(ratio=0.5))
