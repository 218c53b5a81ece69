"""LooGLE: questions on documents of 24k+ tokens written after 2022 (Li et al., arXiv:2311.04939), from
"bigai-nlco/LooGLE" (configs shortdep_qa, longdep_qa, shortdep_cloze, summarization; split "test").

Prompts and generation lengths are the official `config/task2prompt.json` and `config/task2maxlen.json`;
the questions on one document form one sample. Scores, as simple as the official automatic ones allow:
the cloze task is the official exact match (the share of masks named exactly); the QA tasks are token F1
(the official script reports BLEU, ROUGE, METEOR, BERTScore and a GPT-4 judge); the summaries ROUGE-L F1.
Both hub schemas load: one row per question (`context`, `question`, `answer`, ...) and the first release's
one row per document (`input`, `title`, `qa_pairs`, `output`).
"""

from __future__ import annotations

import ast
import json
import re

from ..base import Question
from . import hub
from .metrics import best, qa_f1, rouge_l

CLOZE = ("Please fill in the clozes based on the given long texts below. Each of the placeholder '<mask-n>' in the "
         "question could be an entity of Person, Location or Organiocation. The same masks represent the same "
         "entity. Output a json format answer, for example: {'<mask-0>': 'Bob', '<mask-1>': 'Gorrosion Magazine',"
         "'<mask-2>': 'Bethel Horizon'}\n")
QA = "Please answer the question based on the long texts below. \n"

# task -> (text before the document, question after it, hub config, max new tokens)
TEMPLATES = {
    "shortdep_qa": (QA, "\nQuestion: {Q}\nAnswer: ", "shortdep_qa", 300),
    "longdep_qa": (QA, "\nQuestion: {Q}\nAnswer: ", "longdep_qa", 500),
    "shortdep_cloze": (CLOZE, "\n Question: {Q} What are the masked entities? \nAnswer:", "shortdep_cloze", 50),
    "longdep_summarization": ("Please generate a summary of the below paper. \n", "\n Summarization: ",
                              "summarization", 500),
}
TASKS = tuple(TEMPLATES)


def parse(text) -> object:
    """A Python or JSON literal (the first {...} of a prediction), or None."""
    if not isinstance(text, str):
        return text
    for candidate in (text, *re.findall(r"\{.*?\}", text, re.DOTALL)):
        for load in (ast.literal_eval, json.loads):
            try:
                return load(candidate)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
    return None


def cloze_reference(answer) -> dict:
    """{"<mask-0>": entity, ...} from a dict, a list of entities or their text."""
    answer = parse(answer)
    if isinstance(answer, (list, tuple)):
        return {f"<mask-{i}>": value for i, value in enumerate(answer)}
    return dict(answer or {})


def cloze_exact(prediction: str, reference: str) -> float:
    """The share of masks whose entity the predicted dict names exactly (0 when it is no dict)."""
    masks = json.loads(reference)
    predicted = parse(prediction)
    if not isinstance(predicted, dict) or not masks:
        return 0.0
    return sum(predicted.get(key) == value for key, value in masks.items()) / len(masks)


def qa_pairs(row: dict) -> list[tuple[str, object]]:
    """(question, answer) of a row in either schema; one ("", summary) for a summary."""
    if "question" in row:
        return [(row["question"], row["answer"])]
    pairs = row.get("qa_pairs")
    if pairs in (None, "none", ""):
        return [("", row["output"])]
    return [(pair["Q"], pair["A"]) for pair in parse(pairs)]


class LooGLE(hub.HubBenchmark):
    """LooGLE (arXiv:2311.04939); `data_files`: a local file in either hub schema, a path for one task or
    {task: path}."""

    name = "loogle"
    tasks = TASKS
    hub_id = "bigai-nlco/LooGLE"

    def samples(self, tokenizer, n=None, seed=0):
        out = []
        for task, path in self.files.items():
            prefix, template, config, max_new_tokens = TEMPLATES[task]
            parts = []
            for i, row in enumerate(hub.load_rows(self.hub_id, config, "test", path)):
                document = row["context"] if "context" in row else row["input"]
                for question, answer in qa_pairs(row):
                    reference = (json.dumps(cloze_reference(answer), ensure_ascii=False) if task == "shortdep_cloze"
                                 else str(answer))
                    asked = Question(template.replace("{Q}", question), [reference], max_new_tokens=max_new_tokens)
                    id_ = row.get("doc_id") or row.get("id") or row.get("title") or i
                    parts.append(hub.Part(str(id_), prefix, document, "", [asked], {"title": row.get("title")}))
            out += hub.samples(task, parts, n, seed, tokenizer, self.max_length)
        return out

    def score(self, prediction, question, task):
        hub.check_task(task, TASKS, self.name)
        metric = {"shortdep_cloze": cloze_exact, "longdep_summarization": rouge_l}.get(task, qa_f1)
        return best(metric, prediction, question.answers)

    def describe(self):
        return {"tasks": list(self.tasks), "data_files": {t: p for t, p in self.files.items() if p},
                "max_length": self.max_length}
