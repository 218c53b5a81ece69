"""Batches of contexts of different lengths: each row gets exactly what compressing it alone gives; padding is
never kept, never counted, never attended."""

import pytest
import torch

import kvsqueeze
from kvsqueeze.pipeline import pack
from conftest import build_method, random_ids, tiny_model

LENGTHS = [50, 80, 65, 33]
# every method that compresses a prefill, except Random (its draws depend on the batch), the rolling window
# (positions in the cache: one row at a time) and MiniCache (merged layer pairs hold no padding): those two say so
PREFILL = sorted(name for name, cls in kvsqueeze.available().items()
                 if cls.phase != "decode" and name not in ("random", "rolling_streaming_llm", "minicache"))


def contexts():
    return [random_ids(n, seed=i)[0] for i, n in enumerate(LENGTHS)]


def assert_rows_equal_alone(model, method_factory, chunk_size=None, new_tokens=6):
    question = random_ids(5, seed=9)
    batch = kvsqueeze.compress(model, None, contexts(), method_factory(), chunk_size=chunk_size)
    answers = batch.generate(question, max_new_tokens=new_tokens)
    kept = batch.cache.kept_per_head()
    for row, context in enumerate(contexts()):
        alone = kvsqueeze.compress(model, None, context, method_factory(), chunk_size=chunk_size)
        assert torch.equal(answers[row], alone.generate(question, max_new_tokens=new_tokens)[0]), f"row {row}"
        for layer, (in_batch, by_itself) in enumerate(zip(kept, alone.cache.kept_per_head())):
            if by_itself.numel():
                assert torch.equal(in_batch[row], by_itself[0]), f"row {row}, layer {layer}"
    return batch


@pytest.mark.parametrize("name", [None] + PREFILL)
def test_each_row_of_a_batch_equals_compressing_it_alone(name):
    model = tiny_model(attn="eager" if name == "observed_attention" else "sdpa")
    assert_rows_equal_alone(model, lambda: name and build_method(name, 0.5, model))


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("name", ["snapkv", "adakv"])  # a dense and a head-wise method
def test_batches_in_other_families(family, name):
    model = tiny_model(family)
    assert_rows_equal_alone(model, lambda: build_method(name, 0.5, model))


@pytest.mark.parametrize("name", ["knorm", "snapkv", "adakv", "expected_attention", "streaming_llm"])
def test_chunked_batches_equal_chunking_each_row_alone(name):
    model = tiny_model()
    assert_rows_equal_alone(model, lambda: build_method(name, 0.5, model), chunk_size=16)


def test_chunks_of_a_batch_are_cut_as_each_row_alone():
    rows = [torch.arange(10, 15), torch.arange(20, 29)]  # 5 tokens: 1 chunk of 4 + 1; 9 tokens: 4, 5
    ids, mask, spans = pack(rows, 4, pad_id=0)
    assert spans == [slice(0, 4), slice(4, 9)]
    assert ids.tolist() == [[0, 0, 0, 0, 10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    assert mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1] and bool(mask[1].all())
    ids, mask, spans = pack(rows, None, pad_id=0)
    assert spans == [slice(0, 9)] and mask[0].tolist() == [0] * 4 + [1] * 5


def test_padding_is_never_kept_nor_counted():
    model = tiny_model()
    full = kvsqueeze.compress(model, None, contexts())
    assert full.stats.context_tokens == sum(LENGTHS)
    assert full.stats.kept_per_layer_head == [[sum(LENGTHS)] * 2] * 4  # padding held, but not counted as kept
    squeezed = kvsqueeze.compress(model, None, contexts(), kvsqueeze.KNorm(ratio=0.5))
    assert squeezed.stats.kept_per_layer_head == [[sum(n // 2 for n in LENGTHS)] * 2] * 4
    assert squeezed.stats.compression_ratio == pytest.approx(0.5, abs=0.01)
    for layer in squeezed.cache.layers:  # after compression, every stored token is real
        assert layer.padding_held() == 0 and layer.pads.tolist() == [30, 0, 15, 47]


def test_a_question_per_row_and_save_load_of_a_batch(tmp_path):
    model = tiny_model()
    batch = kvsqueeze.compress(model, None, contexts(), kvsqueeze.AdaKV(ratio=0.5))
    questions = [random_ids(n, seed=20 + n)[0] for n in (3, 7, 5, 4)]
    answers = batch.generate(questions, max_new_tokens=5)
    for row, (context, question) in enumerate(zip(contexts(), questions)):
        alone = kvsqueeze.compress(model, None, context, kvsqueeze.AdaKV(ratio=0.5))
        assert torch.equal(answers[row], alone.generate(question, max_new_tokens=5)[0])
    batch.save(tmp_path / "batch.safetensors")
    loaded = kvsqueeze.CompressedContext.load(tmp_path / "batch.safetensors", model)
    assert loaded.nbytes() == batch.nbytes() and torch.equal(loaded.context_mask, batch.context_mask)
    assert torch.equal(loaded.generate(questions, max_new_tokens=5), answers)
    with pytest.raises(ValueError, match="2 questions for a batch of 4"):
        batch.generate(questions[:2])


def test_batched_ask_on_the_bundled_model(bundled):
    model, tokenizer = bundled
    stories = ["Lena's bicycle is green. She rides it to the market every Friday. " * 3,
               "The lighthouse keeper, Mr. Ortega, has kept a parrot named Captain for twenty years. " * 8,
               "In the village of Brenn, the bakery opens at five in the morning and sells rye bread. " * 5]
    questions = ["What colour is Lena's bicycle?", "What is the parrot's name?", "When does the bakery open?"]
    for method in (None, kvsqueeze.SnapKV(ratio=0.5), kvsqueeze.AdaKV(ratio=0.5)):
        answers = kvsqueeze.compress(model, tokenizer, stories, method).ask(questions, max_new_tokens=12)
        alone = [kvsqueeze.compress(model, tokenizer, s, method).ask(q, max_new_tokens=12)
                 for s, q in zip(stories, questions)]
        assert answers == alone
        if method is None:  # real language: the uncompressed batch answers all three
            assert "green" in answers[0].lower() and "captain" in answers[1].lower() and "five" in answers[2].lower()
        else:
            assert "captain" in answers[1].lower() and "five" in answers[2].lower()
