"""Synthetic benchmarks generated locally: RULER's tasks, passkey retrieval, perplexity under compression."""

import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

import kvsqueeze
from kvsqueeze.evaluation import available, benchmark
from kvsqueeze.evaluation.base import Question
from kvsqueeze.evaluation.benchmarks.passkey import Passkey
from kvsqueeze.evaluation.benchmarks.perplexity import Perplexity, perplexity
from kvsqueeze.evaluation.benchmarks.ruler import NIAH, NOISE, TASKS, VT_INTRO, Ruler
from kvsqueeze.models import bundled_model_path
from kvsqueeze.prompt import Prompt
from conftest import random_ids, tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_model_path())


@pytest.fixture(scope="module", params=[1024, 4096])
def ruler_samples(request, tokenizer):
    return request.param, Ruler(request.param).samples(tokenizer, 2, seed=0)


def total_tokens(tokenizer, sample) -> int:
    """Tokens of the whole sequence as the runner builds it: chat template, context, question, answer budget."""
    prompt, question = Prompt.for_tokenizer(tokenizer), sample.questions[0]
    asked = prompt.question_ids(question.text, question.answer_prefix)
    return prompt.context_ids(sample.context).shape[1] + asked.shape[1] + question.max_new_tokens


def test_every_ruler_task_fills_the_length_without_exceeding_it(tokenizer, ruler_samples):
    length, samples = ruler_samples
    assert [s.id for s in samples] == [f"{task}-{i}" for task in TASKS for i in range(2)]
    for sample in samples:
        assert len(sample.questions) == 1
        total = total_tokens(tokenizer, sample)
        assert total == sample.metadata["tokens"]
        assert 0.9 * length <= total <= length, sample.id
        assert len(tokenizer(sample.context).input_ids) <= length


def test_ruler_samples_depend_on_the_seed_only(tokenizer):
    ruler = Ruler(1024)
    first, again, other = (ruler.samples(tokenizer, 1, seed=s) for s in (0, 0, 1))
    assert first == again
    assert all(a.context != b.context and a.questions[0].answers != b.questions[0].answers
               for a, b in zip(first, other))


def test_niah_needles_hold_the_answers(ruler_samples):
    for sample in ruler_samples[1]:
        if sample.task not in NIAH:
            continue
        spec, question = NIAH[sample.task], sample.questions[0]
        assert len(sample.metadata["keys"]) == spec.queries and len(question.answers) == spec.queries * spec.values
        for key in sample.metadata["keys"]:
            assert key in question.text and key in question.answer_prefix
            # the asked keys are never reused by distractors: each has exactly its own values
            assert sample.context.count(f" for {key} is: ") == spec.values
        for answer in question.answers:
            assert answer in sample.context
            assert any(f" for {key} is: {answer}." in sample.context for key in sample.metadata["keys"])


def test_niah_haystacks_are_the_ones_ruler_names(ruler_samples):
    by_task = {s.task: s for s in ruler_samples[1]}
    assert by_task["niah_single_1"].context.count(NOISE) > 10
    assert NOISE not in by_task["niah_single_2"].context
    assert by_task["niah_multikey_1"].context.count("One of the special magic numbers") == 4
    assert by_task["niah_multikey_2"].context.count("One of the special magic numbers") > 20
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}"
    assert len(re.findall(rf"for {uuid} is: {uuid}\.", by_task["niah_multikey_3"].context)) > 5
    assert re.fullmatch(uuid, by_task["niah_single_3"].questions[0].answers[0])


def test_variable_tracking_answers_are_every_variable_holding_the_value(ruler_samples):
    for sample in (s for s in ruler_samples[1] if s.task == "vt"):
        question = sample.questions[0]
        value = re.search(r"the value (\d+) in the text above", question.text).group(1)
        assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", sample.context))

        def resolve(name):
            source = assigned[name]
            return resolve(source[4:]) if source.startswith("VAR ") else source

        assert sorted(question.answers) == sorted(name for name in assigned if resolve(name) == value)
        assert len(question.answers) == 5 and str(len(question.answers)) in question.answer_prefix
        task_part = sample.context.rsplit(VT_INTRO, 1)[1]
        assert all(f"VAR {name} = " in task_part for name in question.answers)


def test_common_words_answers_are_the_ten_most_common_words(ruler_samples):
    for sample in (s for s in ruler_samples[1] if s.task == "cwe"):
        counts = Counter(re.findall(r"\d+\. ([\w-]+)", sample.context)).most_common()
        answers = sample.questions[0].answers
        assert len(answers) == 10 and {word for word, _ in counts[:10]} == set(answers)
        assert counts[9][1] > counts[10][1]


def test_frequent_words_answers_are_the_three_most_frequent_coded_words(ruler_samples):
    for sample in (s for s in ruler_samples[1] if s.task == "fwe"):
        coded = sample.context.split("\n", 1)[1].split()
        counts = Counter(word for word in coded if word != "...").most_common()
        answers = sample.questions[0].answers
        assert {word for word, _ in counts[:3]} == set(answers)
        assert counts[2][1] > counts[3][1]
        assert coded.count("...") > counts[0][1]  # the noise word is the most frequent of all, as in RULER


def test_ruler_metric_is_string_match_all():
    ruler = Ruler()
    number = Question("", ["1234567"])
    assert ruler.score("The special magic number is 1234567.", number, "niah_single_1") == 100
    assert ruler.score("I do not know.", number, "niah_single_1") == 0
    uuid = Question("", ["6f1d6c4e-1b7a-4a53-9c1e-2f6a9d3b8e11"])
    assert ruler.score("6F1D6C4E-1B7A-4A53-9C1E-2F6A9D3B8E11", uuid, "niah_single_3") == 100
    values = Question("", ["1111111", "2222222", "3333333", "4444444"])
    assert ruler.score("1111111, 3333333 and 5555555", values, "niah_multivalue") == 50
    assert ruler.score("4444444 3333333 2222222 1111111", values, "niah_multiquery") == 100
    variables = Question("", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"])
    assert ruler.score("abcde FGHIJ klmno", variables, "vt") == 60
    words = Question("", "apple river stone cloud maple tiger lemon cedar otter flute".split())
    assert ruler.score("1. apple 2. river 3. stone 4. cloud 5. maple 6. tiger 7. lemon", words, "cwe") == 70
    assert ruler.score("banana", words, "cwe") == 0
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.score("x", number, "qa_squad")


def test_ruler_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task.*niah_single_9"):
        Ruler(tasks=["niah_single_1", "niah_single_9"])
    with pytest.raises(ValueError, match="positive"):
        Ruler(0)
    with pytest.raises(ValueError, match="niah_single_2: a length of 150 tokens is too small"):
        Ruler(150, tasks="niah_single_2").samples(tokenizer, 1)
    with pytest.raises(ValueError, match="cwe: a length of 400 tokens is too small"):
        Ruler(400, tasks=["cwe"]).samples(tokenizer, 1)


def test_benchmarks_are_registered_and_take_their_settings(tokenizer):
    assert {"ruler", "passkey", "perplexity"} <= set(available())
    ruler = benchmark("ruler", length=1024, tasks=["vt", "fwe"])
    assert ruler.tasks == ("vt", "fwe") and ruler.describe() == {"length": 1024, "tasks": ["vt", "fwe"]}
    assert [s.id for s in ruler.samples(tokenizer, 3)] == ["vt-0", "vt-1", "vt-2", "fwe-0", "fwe-1", "fwe-2"]


def test_passkey_sits_at_its_depth_and_fills_the_length(tokenizer):
    samples = Passkey(1024, depths=[0, 0.25, 0.5, 1]).samples(tokenizer)
    assert [s.metadata["depth"] for s in samples] == [0, 0.25, 0.5, 1]
    for sample in samples:
        key = sample.questions[0].answers[0]
        assert re.fullmatch(r"\d{5}", key)
        before, line, after = re.split(r"\n?(The pass key is \d+\. Remember it\. \d+ is the pass key\.)\n?",
                                       sample.context)
        assert key in line
        n_before, n_after = before.count(NOISE), after.count(NOISE)
        assert n_before == round(sample.metadata["depth"] * (n_before + n_after))
        assert 0.9 * 1024 <= total_tokens(tokenizer, sample) <= 1024
    assert samples[0].context.split("\n")[1].startswith("The pass key is")
    assert samples[-1].context.endswith("is the pass key.")
    passkey = Passkey()
    assert passkey.score("The pass key is 68203.", Question("", ["68203"]), "passkey") == 100
    assert passkey.score("The pass key is 68208.", Question("", ["68203"]), "passkey") == 0


def test_passkey_samples_spread_over_depths_and_depend_on_the_seed(tokenizer):
    five = Passkey(512).samples(tokenizer, 5, seed=3)
    assert [s.metadata["depth"] for s in five] == [0, 0.25, 0.5, 0.75, 1]
    assert five == Passkey(512).samples(tokenizer, 5, seed=3)
    assert five[0].questions[0].answers != Passkey(512).samples(tokenizer, 5, seed=4)[0].questions[0].answers
    with pytest.raises(ValueError, match="depths"):
        Passkey(depths=[1.5])
    with pytest.raises(ValueError, match="too small"):
        Passkey(40).samples(tokenizer, 1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_perplexity_without_a_method_is_the_models_own(family):
    model, ids = tiny_model(family), random_ids(120)
    with torch.no_grad():
        logits = model(ids).logits
    expected = math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    for chunk_size in (1, 7, 64, 512):
        assert perplexity(model, None, ids, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-4)


def test_perplexity_sees_the_compressed_cache():
    model, ids = tiny_model(), random_ids(200)
    full = perplexity(model, None, ids, chunk_size=16)
    nothing_removed = perplexity(model, None, ids, kvsqueeze.method("knorm", ratio=0.0), chunk_size=16)
    assert nothing_removed == pytest.approx(full, rel=1e-5)
    for method, chunk_size in ((kvsqueeze.method("knorm", ratio=0.75), 16), (kvsqueeze.H2O(budget=24), 1)):
        compressed = perplexity(model, None, ids, method, chunk_size=chunk_size)
        assert math.isfinite(compressed) and compressed != pytest.approx(full, rel=1e-4)
    with pytest.raises(ValueError, match="chunk_size >= 2"):
        perplexity(model, None, ids, kvsqueeze.method("knorm", ratio=0.5), chunk_size=1)
    with pytest.raises(ValueError, match="whole context"):
        perplexity(model, None, ids, kvsqueeze.ThinK(), chunk_size=16)


def test_perplexity_pieces_are_the_text_in_order_within_the_length(tokenizer, tmp_path):
    samples = Perplexity(1024).samples(tokenizer)
    assert len(samples) >= 8 and all(not s.questions for s in samples)
    assert all(512 <= len(tokenizer(s.context).input_ids) <= 1024 for s in samples)
    flat = " ".join(" ".join(s.context.split()) for s in samples)
    assert " ".join(samples[0].context.split()[:30]) in flat[:1000]
    assert Perplexity(1024).samples(tokenizer, 2) == samples[:2]
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join(f"Paragraph {i} tells of a harbour, a lighthouse and the tide." for i in range(200)))
    pieces = Perplexity(256, path=text).samples(tokenizer)
    assert pieces[0].task == "story" and pieces[0].id == "story-0"
    assert pieces[0].context.startswith("Paragraph 0 ") and f"Paragraph {199} " in pieces[-1].context
    with pytest.raises(NotImplementedError):
        Perplexity().score("x", Question("", []), "essays")
