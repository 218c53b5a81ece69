"""RULER's QA tasks (Hsieh et al., arXiv:2404.06654): a question from SQuAD (qa_1) or HotpotQA (qa_2) asked
over its golden paragraph(s) among distractor paragraphs, as many as fit `length` tokens.

Built as RULER's `scripts/data/synthetic/qa.py` builds them: qa_1 takes the answerable questions of SQuAD
2.0's dev set ("rajpurkar/squad_v2", validation; RULER downloads dev-v2.0.json), the distractors first from
the same article then from anywhere; qa_2 the dev questions of HotpotQA's distractor setting
("hotpotqa/hotpot_qa", "distractor", validation) with their ten paragraphs, then others. The paragraphs are
shuffled, numbered "Document i:", and their number searched so that prompt + 32 generated tokens fit
`length`. A prediction is right when it contains a reference (RULER's string_match_part).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..base import Benchmark, Question, Sample
from . import hub

PREFIX = ("Answer the question based on the given documents. Only give me the answer and do not output any other "
          "words.\n\nThe following are given documents.\n\n")
QUESTION = ("\n\nAnswer the question based on the given documents. Only give me the answer and do not output any "
            "other words.\n\nQuestion: {query}")
ANSWER_PREFIX = " Answer:"
TOKENS_TO_GENERATE = 32
TASKS = ("qa_1", "qa_2")
SOURCES = {"qa_1": ("rajpurkar/squad_v2", None, "validation"),  # (hub id, config, split)
           "qa_2": ("hotpotqa/hotpot_qa", "distractor", "validation")}


@dataclass
class QA:
    id: str
    query: str
    answers: list[str]
    golden: list[int]  # indices of the paragraphs that answer it
    nearby: list[int] = field(default_factory=list)  # distractors taken first (the rest of its SQuAD article)


def read_squad(rows: list[dict]) -> tuple[list[QA], list[str]]:
    docs = sorted({row["context"] for row in rows})
    index = {doc: i for i, doc in enumerate(docs)}
    articles: dict[str, list[int]] = {}
    for row in rows:
        article = articles.setdefault(row["title"], [])
        if index[row["context"]] not in article:
            article.append(index[row["context"]])
    qas = [QA(str(row["id"]), row["question"], list(row["answers"]["text"]), [index[row["context"]]],
              [i for i in articles[row["title"]] if i != index[row["context"]]])
           for row in rows if row["answers"]["text"]]
    return qas, docs


def read_hotpotqa(rows: list[dict]) -> tuple[list[QA], list[str]]:
    def paragraphs(row):
        return [f"{title}\n{''.join(sentences)}"
                for title, sentences in zip(row["context"]["title"], row["context"]["sentences"])]

    docs = sorted({p for row in rows for p in paragraphs(row)})
    index = {doc: i for i, doc in enumerate(docs)}
    return [QA(str(row["id"]), row["question"], [row["answer"]], [index[p] for p in paragraphs(row)])
            for row in rows], docs


def postprocess(prediction: str) -> str:
    """RULER's cleaning: control characters become line breaks, the ends stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_part(prediction: str, references: list[str]) -> float:
    """1 when any reference is in the prediction (case-insensitive)."""
    prediction = postprocess(prediction).lower()
    return float(any(r.lower() in prediction for r in references))


class RulerQA(Benchmark):
    """RULER qa_1 / qa_2 (arXiv:2404.06654) at `length` tokens; `data_files`: local files in the source datasets'
    schemas (SQuAD: `id`, `title`, `context`, `question`, `answers`; HotpotQA: `id`, `question`, `answer`,
    `context` {`title`, `sentences`}, ...), a path for one task or {task: path}."""

    name = "ruler_qa"
    tasks = TASKS

    def __init__(self, length: int = 4096, tasks: list[str] | None = None, data_files: str | dict | None = None):
        self.length = length
        self.files = hub.task_files(tasks, data_files, TASKS, self.name)
        self.tasks = tuple(self.files)

    def samples(self, tokenizer, n=None, seed=0):
        if tokenizer is None:
            raise ValueError("ruler_qa fits its haystack to `length` tokens: it needs the tokenizer")
        out = []
        for task, path in self.files.items():
            hub_id, config, split = SOURCES[task]
            rows = hub.load_rows(hub_id, config, split, path)
            qas, docs = (read_squad if task == "qa_1" else read_hotpotqa)(rows)
            for qa in hub.choose(qas, n, seed):
                out.append(self.sample(task, qa, docs, tokenizer, seed))
        return out

    def context(self, qa: QA, docs: list[str], num_docs: int, seed: int) -> str:
        """The golden paragraphs and `num_docs` - len(golden) distractors, shuffled, numbered."""
        rng = random.Random(f"{seed}-{qa.id}")
        if num_docs < len(docs):
            if num_docs - len(qa.golden) > len(qa.nearby):
                taken = set(qa.golden + qa.nearby)
                others = [i for i in range(len(docs)) if i not in taken]
                chosen = qa.golden + qa.nearby + rng.sample(others, num_docs - len(qa.golden) - len(qa.nearby))
            else:
                chosen = qa.golden + rng.sample(qa.nearby, max(0, num_docs - len(qa.golden)))
        else:
            chosen = (list(range(len(docs))) * (num_docs // len(docs) + 1))[:num_docs]
        paragraphs = [docs[i] for i in chosen]
        random.Random(seed).shuffle(paragraphs)
        return "\n\n".join(f"Document {i + 1}:\n{p}" for i, p in enumerate(paragraphs))

    def sample(self, task: str, qa: QA, docs: list[str], tokenizer, seed: int) -> Sample:
        question = Question(QUESTION.format(query=qa.query), qa.answers, ANSWER_PREFIX, TOKENS_TO_GENERATE)

        def fits(num_docs: int) -> bool:
            text = PREFIX + self.context(qa, docs, num_docs, seed) + question.text + ANSWER_PREFIX
            return hub.n_tokens(tokenizer, text) + TOKENS_TO_GENERATE <= self.length

        low, high = 1, 2  # the largest number of paragraphs that fits: double, then bisect
        while fits(high):
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        if not fits(low):
            raise ValueError(f"ruler_qa: length={self.length} is too short for question {qa.id} and one paragraph")
        return Sample(qa.id, task, PREFIX + self.context(qa, docs, low, seed), [question],
                      {"num_docs": max(low, len(qa.golden)), "length": self.length})

    def score(self, prediction, question, task):
        hub.check_task(task, TASKS, self.name)
        return 100.0 * string_match_part(prediction, question.answers)

    def describe(self):
        return {"length": self.length, "tasks": list(self.tasks),
                "data_files": {t: p for t, p in self.files.items() if p}}
