"""Zero-SCROLLS: ten zero-shot long-text tasks (Shaham et al., arXiv:2305.14196), from "tau/zero_scrolls".

The test split keeps its answers private, so samples come from the small "validation" split. Each row's
`input` is the official prompt: the context is it up to the end of the document, the question the rest.
Generation lengths are the official `dataset_to_leave_tokens_for_generations`; the metrics those of the
leaderboard: ROUGE (geometric mean of ROUGE-1/2/L) for summaries, F1 for QA, accuracy for QuALITY,
exponential similarity for SpaceDigest, concordance index for BookSumSort. With a tokenizer and
`max_length` the document loses its end, followed by the row's `truncation_seperator`, as officially.
"""

from __future__ import annotations

import re
import string

from ..base import Question
from . import hub
from .metrics import ascii_fold, best, qa_f1, rouge_mean

MAX_NEW_TOKENS = {"gov_report": 1024, "summ_screen_fd": 512, "qmsum": 512, "squality": 512, "qasper": 128,
                  "narrative_qa": 64, "quality": 10, "musique": 32, "space_digest": 36, "book_sum_sort": 256}
TASKS = tuple(MAX_NEW_TOKENS)


def f1_score(prediction: str, reference: str) -> float:
    """SQuAD F1, accents folded."""
    return qa_f1(ascii_fold(prediction), ascii_fold(reference))


def letter(text: str) -> str | None:
    found = re.search(r"\b[A-D]\b", text)
    return found.group() if found else None


def accuracy(prediction: str, reference: str) -> float:
    """The first lone letter A-D of the prediction is the reference's."""
    return float(letter(prediction) is not None and letter(prediction) == letter(reference))


def percentage(text: str) -> float | None:
    found = re.search(r"\d+\.?\d*%", text)
    return float(found.group().rstrip("%")) if found else None


def exp_similarity(prediction: str, reference: str) -> float:
    """0.5 ** (|predicted - true percentage| / 10); 0 without a percentage."""
    predicted = percentage(prediction)
    return 0.0 if predicted is None else 0.5 ** (abs((percentage(reference) or 0.0) - predicted) / 10)


def summary_ids(text: str) -> list[int]:
    """The numbers of a summary order ("3, 1, 2"); [] when it holds anything else."""
    kept = re.sub(r"[^0-9\s,]", "", text).replace(",", " ").strip(string.punctuation).split()
    try:
        return [int(x) for x in kept]
    except ValueError:
        return []


def concordance_index(prediction: str, reference: str) -> float:
    """The share of summary pairs put in the right relative order; 0 unless the same summaries are ordered."""
    predicted, gold = summary_ids(prediction), summary_ids(reference)
    if not gold or sorted(predicted) != sorted(gold):
        return 0.0
    position_p = {summary: i for i, summary in enumerate(predicted)}
    position_g = {summary: i for i, summary in enumerate(gold)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1:]]
    if not pairs:
        return 1.0
    right = sum((position_g[a] - position_g[b]) * (position_p[a] - position_p[b]) > 0 for a, b in pairs)
    return right / len(pairs)


METRICS = {"gov_report": rouge_mean, "summ_screen_fd": rouge_mean, "qmsum": rouge_mean, "squality": rouge_mean,
           "qasper": f1_score, "narrative_qa": f1_score, "musique": f1_score, "quality": accuracy,
           "space_digest": exp_similarity, "book_sum_sort": concordance_index}


class ZeroScrolls(hub.HubBenchmark):
    """Zero-SCROLLS (arXiv:2305.14196); `data_files`: a local file in its schema (`id`, `pid`, `input`, `output`,
    `document_start_index`, `document_end_index`, `query_start_index`, `query_end_index`,
    `truncation_seperator`), a path for one task or {task: path}. Rows with one id are one question with
    several references."""

    name = "zero_scrolls"
    tasks = TASKS
    hub_id = "tau/zero_scrolls"

    def __init__(self, tasks: list[str] | None = None, data_files: str | dict | None = None,
                 max_length: int | None = None, split: str = "validation"):
        super().__init__(tasks, data_files, max_length)
        self.split = split

    def samples(self, tokenizer, n=None, seed=0):
        out = []
        for task, path in self.files.items():
            rows: dict[str, dict] = {}
            for row in hub.load_rows(self.hub_id, task, self.split, path):
                rows.setdefault(row["id"], dict(row, outputs=[]))["outputs"].append(row["output"])
            parts = []
            for id_, row in rows.items():
                text, start, end = row["input"], row["document_start_index"], row["document_end_index"]
                question = Question(text[end:], [o for o in row["outputs"] if o], max_new_tokens=MAX_NEW_TOKENS[task])
                parts.append(hub.Part(str(id_), text[:start], text[start:end], "", [question]))
            marker = next(iter(rows.values()))["truncation_seperator"] if rows else ""
            out += hub.samples(task, parts, n, seed, tokenizer, self.max_length, keep="end", marker=marker)
        return out

    def score(self, prediction, question, task):
        hub.check_task(task, TASKS, self.name)
        return best(METRICS[task], prediction, question.answers)

    def describe(self):
        return {"tasks": list(self.tasks), "data_files": {t: p for t, p in self.files.items() if p},
                "max_length": self.max_length, "split": self.split}
