"""Hub benchmarks: loaders read small local files in each dataset's own schema (tests/data/eval, made-up
content), and the official metrics give hand-computed scores. Nothing is downloaded."""

import json
from pathlib import Path

import pytest

from kvsqueeze import evaluation
from kvsqueeze.evaluation.benchmarks import hub, infinitebench, longbench, loogle, metrics, zero_scrolls
from kvsqueeze.evaluation.benchmarks.aime25 import AIME25, INSTRUCTION
from kvsqueeze.evaluation.benchmarks.infinitebench import InfiniteBench
from kvsqueeze.evaluation.benchmarks.longbench import LongBench
from kvsqueeze.evaluation.benchmarks.longbench_e import LongBenchE
from kvsqueeze.evaluation.benchmarks.longbench_v2 import LongBenchV2
from kvsqueeze.evaluation.benchmarks.loogle import LooGLE
from kvsqueeze.evaluation.benchmarks.math500 import Math500
from kvsqueeze.evaluation.benchmarks.ruler_qa import RulerQA
from kvsqueeze.evaluation.benchmarks.zero_scrolls import ZeroScrolls

DATA = Path(__file__).parent / "data" / "eval"


class WordTokenizer:
    """One token per whitespace-separated word: enough to test lengths without a model."""

    class Encoding:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, add_special_tokens=False):
        return self.Encoding(text.split())

    def decode(self, ids, skip_special_tokens=True):
        return "".join(" " + token for token in ids)  # like real tokens, each word carries its space


def lines(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


# ---------------------------------------------------------------- shared metrics, by hand

def test_qa_f1_normalises_and_counts_shared_words():
    assert metrics.normalize_answer("The Cat, sat!") == "cat sat"
    # "the cat sat" -> [cat, sat]; "cat sat down": 2 shared words, precision 1, recall 2/3, F1 0.8
    assert metrics.qa_f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert metrics.qa_f1("a dog", "the cat") == 0.0
    assert metrics.exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    # characters: 北京大学 vs 北京: 2 shared of 4 and 2 -> precision 1/2, recall 1, F1 2/3
    assert metrics.qa_f1_zh("北京大学。", "北京") == pytest.approx(2 / 3)


def test_rouge_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is "the cat on the mat": 5 of 6 and 6
    assert metrics.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("", "the cat") == 0.0
    p, r = metrics.rouge_tokens("The cat sat."), metrics.rouge_tokens("the cat sat down")
    assert p == ["the", "cat", "sat"]
    assert metrics.rouge_n(p, r, 1) == pytest.approx(2 * 1 * 0.75 / 1.75)  # 3 shared of 3 and 4
    assert metrics.rouge_n(p, r, 2) == pytest.approx(2 * 1 * (2 / 3) / (5 / 3))  # 2 shared bigrams of 2 and 3
    expected = (metrics.rouge_n(p, r, 1) * metrics.rouge_n(p, r, 2) * metrics.rouge_l(p, r)) ** (1 / 3)
    assert metrics.rouge_mean("The cat sat.", "the cat sat down") == pytest.approx(expected)
    assert metrics.rouge_l_zh("今天 很好", "今天好") == pytest.approx(2 * 1 * (3 / 4) / (7 / 4))  # LCS 今天好


def test_answer_extraction():
    assert metrics.choice_letter("The correct answer is (B)") == "B"
    assert metrics.choice_letter("**The correct answer is C**") == "C"
    assert metrics.choice_letter("The answer is (B)") is None  # LongBench v2 reads only "The correct answer is"
    assert metrics.last_boxed("first \\boxed{3}, then \\boxed{12}.") == "12"
    assert metrics.last_boxed("$\\boxed{\\frac{1}{2}}$") == "\\frac{1}{2}"
    assert metrics.last_boxed("no box") is None
    assert metrics.final_answer("so \\boxed{12}") == "12"
    assert metrics.final_answer("3 apples, so the total is 1,234") == "1234"
    assert metrics.final_answer("nothing") is None


def test_math_answers_compare_after_normalisation():
    assert metrics.math_equal("\\dfrac{1}{2}", "\\frac12")
    assert metrics.math_equal("0.5", "\\frac{1}{2}")
    assert metrics.math_equal("x = 3", "3")
    assert metrics.math_equal("10\\%", "10")
    assert metrics.math_equal("1/3", "\\frac{1}{3}")
    assert metrics.math_equal("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})")
    assert not metrics.math_equal("4", "5")
    assert not metrics.math_equal(None, "5")


# ---------------------------------------------------------------- LongBench

def test_longbench_metrics_by_hand():
    classes = ["Location", "Entity", "Human being"]
    assert longbench.classification_score("Location and Entity", "Location", all_classes=classes) == 0.5
    assert longbench.classification_score("Human being", "Location", all_classes=classes) == 0.0
    assert longbench.retrieval_score("Paragraph 3, not Paragraph 12", "Paragraph 3") == 0.5
    assert longbench.retrieval_score("段落3", "段落3", pattern=r"段落(\d+)") == 1.0
    assert longbench.count_score("There are 7 unique paragraphs: 7", "7") == 1.0
    assert longbench.count_score("7 or 8", "7") == 0.5
    assert longbench.count_score("none", "7") == 0.0
    assert longbench.code_sim_score("```python\nx = foo(1)\n```", "x = foo(1)") == 1.0
    assert longbench.code_sim_score("abcd", "abce") == 0.75  # difflib: 2 * 3 matches / 8 characters


def test_longbench_loads_and_groups_questions_on_one_story():
    bench = LongBench(tasks=["narrativeqa"], data_files=DATA / "longbench_narrativeqa.jsonl")
    rows = lines("longbench_narrativeqa.jsonl")
    samples = bench.samples(None)
    assert [s.id for s in samples] == ["nq-0001", "nq-0003"] and all(s.task == "narrativeqa" for s in samples)
    first = samples[0]
    prefix, rest = longbench.PROMPTS["narrativeqa"].split("{context}")
    assert first.context == prefix + rows[0]["context"] and first.context.endswith("harbour master.")
    assert [q.text for q in first.questions] == [rest.replace("{input}", r["input"]) for r in rows[:2]]
    assert first.questions[0].text.endswith("Question: How many winters did Mara keep the lighthouse?\n\nAnswer:")
    assert first.questions[1].answers == ["a crate of oranges", "oranges"]
    assert {q.max_new_tokens for q in first.questions} == {128}
    assert first.metadata == {"length": 58, "language": "en"} and first.chat_template
    assert len(bench.samples(None, n=1, seed=3)) == 1
    assert bench.score("Eleven winters.", first.questions[0], "narrativeqa") == 100.0
    assert bench.score("a crate", first.questions[1], "narrativeqa") == 50.0  # best of the two references
    assert bench.score("The sisters", samples[1].questions[0], "narrativeqa") == pytest.approx(100 * 2 / 3)


def test_longbench_classification_keeps_the_classes_and_the_first_line():
    bench = LongBench(data_files={"trec": DATA / "longbench_trec.jsonl"})
    assert bench.tasks == ("trec",)
    (sample,) = bench.samples(None)  # both questions share the few-shot examples
    assert not sample.chat_template  # pred.py prompts few-shot and code tasks bare
    question = sample.questions[0]
    assert question.metadata["all_classes"][4] == "Location" and question.max_new_tokens == 64
    assert question.text == "\nQuestion: Where was the treaty signed?\nType:"
    assert bench.score("Location\nHuman being", question, "trec") == 100.0  # only the first line counts
    assert bench.score("Location or Entity", question, "trec") == 50.0


def test_longbench_e_records_the_length_bucket():
    bench = LongBenchE(tasks=["hotpotqa"], data_files=DATA / "longbench_e_hotpotqa.jsonl")
    samples = bench.samples(None)
    assert [s.metadata["length_bucket"] for s in samples] == ["0-4k", "8k+"]
    assert bench.score("Anna Kessel", samples[0].questions[0], "hotpotqa") == 100.0
    with pytest.raises(ValueError, match="valid tasks: qasper, multifieldqa_en"):
        LongBenchE(tasks=["narrativeqa"])  # in LongBench, not in LongBench-E


def test_long_contexts_lose_their_middle_to_fit_max_length():
    tokenizer = WordTokenizer()
    assert hub.cut(tokenizer, "a b c d e f", 4) == " a b e f"
    assert hub.cut(tokenizer, "a b c d e f", 5) == " a b d e f"
    assert hub.cut(tokenizer, "a b c", 4) == "a b c"
    assert hub.cut(tokenizer, "a b c d e f", 3, keep="end", marker=" [cut]") == " a b [cut]"
    bench = LongBench(tasks=["narrativeqa"], data_files=DATA / "longbench_narrativeqa.jsonl", max_length=90)
    sample = bench.samples(tokenizer)[0]
    story = lines("longbench_narrativeqa.jsonl")[0]["context"].split()
    prefix = longbench.PROMPTS["narrativeqa"].split("{context}")[0].split()
    budget = 90 - len(prefix) - max(len(q.text.split()) for q in sample.questions)  # 90 - 38 - 34 = 18 words
    assert 0 < budget < len(story)
    assert sample.context.split() == prefix + story[:budget // 2] + story[len(story) - (budget - budget // 2):]
    assert max(len((sample.context + q.text).split()) for q in sample.questions) == 90
    with pytest.raises(ValueError, match="no room"):
        LongBench(tasks=["narrativeqa"], data_files=DATA / "longbench_narrativeqa.jsonl",
                  max_length=20).samples(tokenizer)


@pytest.mark.bundled
def test_middle_truncation_with_the_bundled_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from kvsqueeze.models import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    story = " ".join(f"Sentence {i} of the long story." for i in range(400))
    row = dict(lines("longbench_narrativeqa.jsonl")[0], context=story)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(row) + "\n")
    sample = LongBench(tasks=["narrativeqa"], data_files=path, max_length=500).samples(tokenizer)[0]
    question = sample.questions[0].text
    assert 490 <= hub.n_tokens(tokenizer, sample.context + question) <= 500
    assert "Sentence 0 of the long story." in sample.context
    assert sample.context.endswith("Sentence 399 of the long story.")
    assert "Sentence 200 of" not in sample.context
    assert question.endswith("Question: How many winters did Mara keep the lighthouse?\n\nAnswer:")


# ---------------------------------------------------------------- LongBench v2

def test_longbench_v2_multiple_choice():
    bench = LongBenchV2(data_files=DATA / "longbench_v2.jsonl")
    samples = bench.samples(None)
    assert [s.task for s in samples] == ["single_document_qa", "long_dialogue_history_understanding"]
    sample = samples[0]
    assert sample.id == "66f36490821e116aacb2cc22"
    assert sample.context.startswith("Please read the following text and answer the question below.\n\n<text>\nMara")
    assert sample.context.endswith("harbour master.\n</text>")
    question = sample.questions[0]
    assert "\n(B) To deliver a letter and supplies\n" in question.text and question.answers == ["B"]
    assert question.text.endswith('"The correct answer is (insert answer here)".') and question.max_new_tokens == 128
    assert bench.score("The correct answer is (B)", question, sample.task) == 100.0
    assert bench.score("The answer is (B)", question, sample.task) == 0.0
    assert bench.score("The correct answer is (A)", question, sample.task) == 0.0
    only = LongBenchV2(tasks=["long_dialogue_history_understanding"], data_files=DATA / "longbench_v2.jsonl")
    assert [s.id for s in only.samples(None)] == ["66ebd4a35a08c7b9b35e0a11"]


def test_longbench_v2_chain_of_thought_asks_the_answer_after_the_reasoning():
    sample = LongBenchV2(data_files=DATA / "longbench_v2.jsonl", cot=True).samples(None)[0]
    assert sample.context.startswith("Please read the following text and answer the questions below.\n\n<text>\n")
    reasoning = sample.questions[0]
    assert reasoning.text.endswith("\n(D) " + reasoning.metadata["choices"]["D"] + "\n\nLet\u2019s think step by step:")
    assert reasoning.max_new_tokens == 1024 and reasoning.text.startswith("\n\nWhat is the correct answer")
    answer = reasoning.then("  Mara sails to deliver supplies. \n")
    assert answer.text.startswith("Please read the following text and answer the questions below.\n\nThe text is "
                                  "too long and omitted here.\n\nWhat is the correct answer to this question: ")
    assert "\n\nLet\u2019s think step by step: Mara sails to deliver supplies.\n\nBased on the above, what is the " \
           "single, most likely answer choice? Format your response as follows: " in answer.text
    assert answer.max_new_tokens == 128 and answer.then is None and answer.answers == ["B"]


# ---------------------------------------------------------------- InfiniteBench

def test_infinitebench_passkey_and_retrieval():
    bench = InfiniteBench(tasks=["passkey"], data_files=DATA / "infinitebench_passkey.jsonl")
    samples = bench.samples(None)
    assert len(samples) == 2 and samples[0].id == "0"
    question = samples[0].questions[0]
    assert samples[0].context.startswith("There is an important info hidden inside a lot of irrelevant text. Find it "
                                         "and memorize them.") and "The pass key is 71432." in samples[0].context
    assert question.text == "\n\nWhat is the pass key?" and question.answer_prefix == "The pass key is"
    assert question.max_new_tokens == 6 and question.answers == ["71432"]
    assert bench.score(" 71432.", question, "passkey") == 100.0
    assert bench.score("7143", question, "passkey") == 0.0
    answer = ["9b1f0c2e-7d4a-4c1b-8e2f-0a1b2c3d4e5f"]
    kv = infinitebench.InfiniteBench(tasks=["kv_retrieval"])
    assert kv.score(f'"{answer[0]}".', evaluation.Question("", answer), "kv_retrieval") == 100.0


def test_infinitebench_choices_code_and_math():
    bench = InfiniteBench(data_files={"longbook_choice_eng": DATA / "infinitebench_longbook_choice_eng.jsonl",
                                      "code_run": DATA / "infinitebench_code_run.jsonl",
                                      "math_find": DATA / "infinitebench_math_find.jsonl",
                                      "code_debug": DATA / "infinitebench_code_debug.jsonl"})
    samples = bench.samples(None)
    assert [s.task for s in samples] == ["longbook_choice_eng", "code_run", "code_run", "math_find", "code_debug"]
    choice, _, run, find, debug = samples  # the code_run prompts name their function before the code
    assert len(choice.questions) == 2  # one book, two questions
    q = choice.questions[0]
    assert q.text.endswith("\nA. Walking Georgie\nB. Mending fences\nC. Working in the dairy\nD. Light housework")
    assert q.answers == ["Light housework", "D"] and q.answer_prefix == "The letter of the correct answer is"
    assert bench.score(" D", q, "longbook_choice_eng") == 100.0
    assert bench.score("The answer is: D.", q, "longbook_choice_eng") == 100.0
    assert bench.score("B", q, "longbook_choice_eng") == 0.0

    assert run.context.startswith("There is a function called func_1 in the following Python code.\n\ndef func_0")
    q = run.questions[0]
    assert q.text == "\n\nPlease compute the exact value of func_1(-5)."
    assert q.answer_prefix == "The value of func_1(-5) is"
    assert bench.score(" -4", q, "code_run") == 100.0  # the last word, as an integer: "-4"
    assert bench.score("4", q, "code_run") == 0.0

    assert find.context.startswith("What is the largest number in the following list?\n\n[12, 7, 93")
    assert bench.score("93", find.questions[0], "math_find") == 100.0
    assert bench.score("12", find.questions[0], "math_find") == 0.0

    q = debug.questions[0]
    assert q.answers == ["parse", "B"] and q.text == "\n\nOptions:\nA. load\nB. parse\nC. main\nD. save"
    assert bench.score(" B", q, "code_debug") == 100.0  # after "The correct option is:"
    assert bench.score("B. parse", q, "code_debug") == 100.0
    assert bench.score(" A", q, "code_debug") == 0.0


def test_infinitebench_other_official_scores():
    bench = InfiniteBench()
    assert bench.score("1, 4, 9, 2", evaluation.Question("", ["1", "4", "8", "3"]), "math_calc") == 50.0
    assert bench.score(" JOHN", evaluation.Question("", ["JOHN"]), "longdialogue_qa_eng") == 100.0
    assert bench.score("Mary", evaluation.Question("", ["JOHN"]), "longdialogue_qa_eng") == 0.0
    assert bench.score("the cat sat", evaluation.Question("", ["cat sat down"]), "longbook_qa_eng") == pytest.approx(80)
    with pytest.raises(ValueError, match="valid tasks: passkey, number_string"):
        bench.score("x", evaluation.Question("", ["x"]), "passkey_retrieval")


# ---------------------------------------------------------------- LooGLE

def test_loogle_groups_the_questions_of_a_document():
    bench = LooGLE(tasks=["longdep_qa"], data_files=DATA / "loogle_longdep_qa.jsonl")
    samples = bench.samples(None)
    rows = lines("loogle_longdep_qa.jsonl")
    assert len(samples) == 2 and [len(s.questions) for s in samples] == [2, 1]
    first = samples[0]
    assert first.context == "Please answer the question based on the long texts below. \n" + rows[0]["context"]
    assert first.questions[1].text == "\nQuestion: How many passengers did the first train carry?\nAnswer: "
    assert first.questions[1].answers == ["340"] and first.questions[0].max_new_tokens == 500
    assert bench.score("340 passengers", first.questions[1], "longdep_qa") == pytest.approx(100 * 2 / 3)


def test_loogle_cloze_in_the_first_schema_is_exact_match():
    bench = LooGLE(tasks=["shortdep_cloze"], data_files=DATA / "loogle_shortdep_cloze_v1.jsonl")
    (sample,) = bench.samples(None)
    question = sample.questions[0]
    assert sample.id == "Harrow Valley railway" and question.max_new_tokens == 50
    assert question.text.startswith("\n Question: <mask-0> was the chief engineer") and question.text.endswith(
        "What are the masked entities? \nAnswer:")
    assert json.loads(question.answers[0]) == {"<mask-0>": "Lena Ortiz", "<mask-1>": "Lyon"}
    assert bench.score("{'<mask-0>': 'Lena Ortiz', '<mask-1>': 'Lyon'}", question, "shortdep_cloze") == 100.0
    assert bench.score('Sure: {"<mask-0>": "Lena Ortiz", "<mask-1>": "Paris"}', question, "shortdep_cloze") == 50.0
    assert bench.score("Lena Ortiz and Lyon", question, "shortdep_cloze") == 0.0
    assert loogle.cloze_reference(["A", "B"]) == {"<mask-0>": "A", "<mask-1>": "B"}


# ---------------------------------------------------------------- Zero-SCROLLS

def test_zero_scrolls_splits_the_prompt_and_merges_references():
    bench = ZeroScrolls(tasks=["qasper"], data_files=DATA / "zero_scrolls_qasper.jsonl")
    (sample,) = bench.samples(None)  # two questions on one article
    row = lines("zero_scrolls_qasper.jsonl")[0]
    assert sample.context == row["input"][:row["document_end_index"]] and sample.context.endswith("on a phone.")
    first, second = sample.questions
    assert first.text == "\n\nQuestion:\nDoes the model run on a phone?\n\nAnswer:"
    assert first.answers == ["yes", "Yes, it runs on a phone."] and first.max_new_tokens == 128
    assert second.answers == ["40 hours"]
    assert bench.score("Yes", first, "qasper") == 100.0
    assert bench.score("40 hours of audio", second, "qasper") == pytest.approx(100 * 2 * 0.5 / 1.5)


def test_zero_scrolls_cuts_the_end_of_the_document():
    bench = ZeroScrolls(tasks=["qasper"], data_files=DATA / "zero_scrolls_qasper.jsonl", max_length=75)
    (sample,) = bench.samples(WordTokenizer())  # 53 words before the article, 9 after: 5 for it, 8 for the marker
    assert sample.context.endswith("Article:\n We train a small transformer... [The rest of the article is omitted]"
                                   "\n\n")
    assert max(len((sample.context + q.text).split()) for q in sample.questions) <= 75


def test_zero_scrolls_metrics_by_hand():
    assert zero_scrolls.accuracy("The answer is (B)", "(B) the mill") == 1.0
    assert zero_scrolls.accuracy("I think C", "(B) the mill") == 0.0
    assert zero_scrolls.exp_similarity("about 40%", "60%") == pytest.approx(0.25)  # 0.5 ** (20 / 10)
    assert zero_scrolls.exp_similarity("no idea", "60%") == 0.0
    assert zero_scrolls.concordance_index("1, 2, 3", "1, 2, 3") == 1.0
    assert zero_scrolls.concordance_index("2, 1, 3", "1, 2, 3") == pytest.approx(2 / 3)  # 1 of 3 pairs swapped
    assert zero_scrolls.concordance_index("1, 2", "1, 2, 3") == 0.0
    assert zero_scrolls.f1_score("Café Müller", "cafe muller") == 1.0


# ---------------------------------------------------------------- AIME 2025 and MATH-500

def test_aime25():
    bench = AIME25(data_files=DATA / "aime25.jsonl")
    samples = bench.samples(None)
    assert [s.id for s in samples] == ["0", "1"] and samples[0].context.startswith("Find the sum of all positive")
    question = samples[0].questions[0]
    assert question.text == INSTRUCTION and question.answers == ["27"] and question.max_new_tokens == 32768
    assert bench.score("... so the sum is \\boxed{27}.", question, "aime25") == 100.0
    assert bench.score("The answer is 027", question, "aime25") == 100.0  # the last number, as an integer
    assert bench.score("\\boxed{12}", question, "aime25") == 0.0
    assert bench.score("I cannot tell", question, "aime25") == 0.0


def test_math500():
    bench = Math500(data_files=DATA / "math500.jsonl", max_new_tokens=4096)
    samples = bench.samples(None)
    assert samples[0].id == "test/prealgebra/101.json" and samples[0].metadata == {"subject": "Prealgebra", "level": 1}
    half, six = samples[0].questions[0], samples[1].questions[0]
    assert half.max_new_tokens == 4096
    assert bench.score("Simplify: $\\boxed{\\dfrac12}$", half, "math500") == 100.0
    assert bench.score("$\\boxed{0.5}$", half, "math500") == 100.0
    assert bench.score("$x = \\boxed{6}$", six, "math500") == 100.0
    assert bench.score("$\\boxed{7}$", six, "math500") == 0.0


# ---------------------------------------------------------------- RULER QA

def test_ruler_qa_fills_the_length_with_distractors():
    tokenizer = WordTokenizer()
    files = {"qa_1": DATA / "squad_v2.jsonl", "qa_2": DATA / "hotpot_qa.jsonl"}
    short, long = RulerQA(length=150, data_files=files), RulerQA(length=400, data_files=files)
    samples = short.samples(tokenizer)
    assert [s.task for s in samples] == ["qa_1", "qa_1", "qa_2", "qa_2"]  # the unanswerable SQuAD question left out
    bridge = samples[0]
    assert bridge.id == "56de10b44396321400ee2593"
    assert bridge.context.startswith("Answer the question based on the given documents. Only give me the answer and "
                                     "do not output any other words.\n\nThe following are given documents.\n\n"
                                     "Document 1:\n")
    assert "It opened in 1907" in bridge.context
    question = bridge.questions[0]
    assert question.text.endswith("\n\nQuestion: When did the Vellmar bridge open?")
    assert question.answer_prefix == " Answer:" and question.max_new_tokens == 32
    for sample in samples:
        tokens = len((sample.context + sample.questions[0].text + " Answer:").split())
        assert tokens + 32 <= 150
    again = long.samples(tokenizer)[0]
    assert again.metadata["num_docs"] > bridge.metadata["num_docs"] and len(again.context.split()) + 40 <= 400
    assert "Document 3:" in again.context  # paragraphs repeat once the three of the file are used
    hotpot = samples[2]
    assert "Anna Kessel\nAnna Kessel was an engineer. She designed the Vellmar bridge." in hotpot.context
    assert short.score("It opened in 1907.", question, "qa_1") == 100.0
    assert short.score("The Oster", hotpot.questions[0], "qa_2") == 100.0
    assert short.score("1906", question, "qa_1") == 0.0
    with pytest.raises(ValueError, match="too short"):
        RulerQA(length=40, data_files=files).samples(tokenizer)


# ---------------------------------------------------------------- registry, task names, hub ids

def test_registered_with_their_names_and_built_from_settings():
    registry = evaluation.available()
    for name in ("longbench", "longbench_e", "longbench_v2", "infinitebench", "loogle", "zero_scrolls", "aime25",
                 "math500", "ruler_qa"):
        assert registry[name].name == name and registry[name].__doc__
    bench = evaluation.benchmark("longbench", tasks=["narrativeqa"], length=4096, lengths=[4096],
                                 data_files=str(DATA / "longbench_narrativeqa.jsonl"))
    assert bench.describe()["tasks"] == ["narrativeqa"]
    assert evaluation.benchmark("ruler_qa", length=2048).length == 2048
    for bench in (LongBench(data_files={"trec": DATA / "longbench_trec.jsonl"}), LongBenchV2(data_files=DATA / "x"),
                  AIME25(data_files=DATA / "x"), Math500(), RulerQA(), ZeroScrolls(), LooGLE(), InfiniteBench()):
        json.dumps(bench.describe())  # recorded with every result row


@pytest.mark.parametrize("cls", [LongBench, LongBenchE, LongBenchV2, InfiniteBench, LooGLE, ZeroScrolls, RulerQA])
def test_unknown_tasks_are_refused_with_the_valid_ones(cls):
    with pytest.raises(ValueError, match="valid tasks: "):
        cls(tasks=["no_such_task"])
    with pytest.raises(ValueError, match="valid tasks: "):
        cls().score("x", evaluation.Question("", ["x"]), "no_such_task")


def test_one_file_for_several_tasks_is_refused():
    with pytest.raises(ValueError, match="one data file for 2 tasks"):
        LongBench(tasks=["narrativeqa", "trec"], data_files=DATA / "longbench_trec.jsonl")


def test_without_files_the_real_hub_datasets_are_asked_for(monkeypatch):
    """Each loader calls `datasets.load_dataset` with the dataset's hub id, config and split."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return []

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    LongBench(tasks=["qasper"]).samples(None)
    LongBenchE(tasks=["qasper"]).samples(None)
    LongBenchV2().samples(None)
    InfiniteBench(tasks=["passkey"]).samples(None)
    LooGLE(tasks=["longdep_summarization"]).samples(None)
    ZeroScrolls(tasks=["quality"]).samples(None)
    AIME25().samples(None)
    Math500().samples(None)
    RulerQA(tasks=["qa_1", "qa_2"]).samples(WordTokenizer())
    assert calls == [("THUDM/LongBench", "qasper", "test"), ("THUDM/LongBench", "qasper_e", "test"),
                     ("THUDM/LongBench-v2", None, "train"), ("xinrongzhang2022/InfiniteBench", None, "passkey"),
                     ("bigai-nlco/LooGLE", "summarization", "test"), ("tau/zero_scrolls", "quality", "validation"),
                     ("opencompass/AIME2025", "AIME2025-I", "test"), ("opencompass/AIME2025", "AIME2025-II", "test"),
                     ("HuggingFaceH4/MATH-500", None, "test"), ("rajpurkar/squad_v2", None, "validation"),
                     ("hotpotqa/hotpot_qa", "distractor", "validation")]
