"""Batches of contexts of different lengths: each row gets exactly what compressing it alone gives; padding is
never kept, never counted, never attended."""

import pytest
import torch

import kvsqueeze
from kvsqueeze.layout import pack
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


def stacked_answers_equal_alone(model, contexts_and_questions, new_tokens=5):
    stacked = kvsqueeze.CompressedContext.stack([ctx for ctx, _ in contexts_and_questions])
    answers = stacked.generate([question for _, question in contexts_and_questions], max_new_tokens=new_tokens)
    for row, (ctx, question) in enumerate(contexts_and_questions):
        assert torch.equal(answers[row], ctx.generate(question, max_new_tokens=new_tokens)[0]), f"row {row}"
    return stacked


@pytest.mark.parametrize("quantizer", [None, "kivi-4"])
def test_separately_compressed_contexts_answer_in_one_batch_as_alone(quantizer):
    model = tiny_model()
    methods = [None, kvsqueeze.KNorm(ratio=0.5), kvsqueeze.AdaKV(ratio=0.5), kvsqueeze.SnapKV(ratio=0.75)]
    compressed = [kvsqueeze.compress(model, None, ids, method, quantizer=quantizer)
                  for ids, method in zip(contexts(), methods)]
    questions = [random_ids(n, seed=30 + n)[0] for n in (3, 6, 4, 5)]
    stacked = stacked_answers_equal_alone(model, list(zip(compressed, questions)) + [(compressed[1], questions[0])])
    assert stacked.batch_size == 5 and stacked.stats.context_tokens == sum(LENGTHS) + LENGTHS[1]
    rows = compressed + [compressed[1]]
    for layer, kept in enumerate(stacked.cache.kept_per_head()):  # every row holds exactly its context's tokens
        assert torch.equal(kept, torch.cat([ctx.cache.kept_per_head()[layer] for ctx in rows]))


def test_pruned_key_channels_share_a_batch_with_pruned_ones():
    model = tiny_model()
    compressed = [kvsqueeze.compress(model, None, ids, kvsqueeze.ThinK(key_channel_ratio=0.5)) for ids in contexts()]
    stacked_answers_equal_alone(model, [(ctx, random_ids(4, seed=50 + i)[0]) for i, ctx in enumerate(compressed)])
    with pytest.raises(ValueError, match="pruned key channels"):
        kvsqueeze.CompressedContext.stack([compressed[0], kvsqueeze.compress(model, None, contexts()[1])])


def test_one_context_answers_several_questions_at_once():
    model = tiny_model()
    for method in (None, kvsqueeze.AdaKV(ratio=0.5)):
        ctx = kvsqueeze.compress(model, None, contexts()[0], method, quantizer="kivi-2")
        questions = [random_ids(n, seed=40 + n)[0] for n in (2, 5, 3)]
        answers = ctx.generate(questions, max_new_tokens=4)
        for row, question in enumerate(questions):
            assert torch.equal(answers[row], ctx.generate(question, max_new_tokens=4)[0])


def test_what_cannot_share_a_batch_is_refused():
    model = tiny_model()
    plain = kvsqueeze.compress(model, None, contexts()[0])
    with pytest.raises(ValueError, match="different quantizers"):
        kvsqueeze.CompressedContext.stack([plain, kvsqueeze.compress(model, None, contexts()[1], quantizer="kivi-4")])
    with pytest.raises(ValueError, match="single contexts"):
        kvsqueeze.CompressedContext.stack([plain, kvsqueeze.compress(model, None, contexts()[:2])])
    with pytest.raises(ValueError, match="different models"):
        kvsqueeze.CompressedContext.stack([plain, kvsqueeze.compress(tiny_model(), None, contexts()[1])])
    gemma = tiny_model("gemma3")
    with pytest.raises(ValueError, match="sliding-window"):
        kvsqueeze.CompressedContext.stack([kvsqueeze.compress(gemma, None, ids) for ids in contexts()[:2]])
    with pytest.raises(ValueError, match="no context"):
        kvsqueeze.CompressedContext.stack([])
