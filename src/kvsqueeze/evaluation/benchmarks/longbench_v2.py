"""LongBench v2: 503 hard multiple-choice questions on 8k-2M word contexts (Bai et al., arXiv:2412.15204),
from "THUDM/LongBench-v2" (split "train", its only one).

The prompt is the official zero-shot one (`prompts/0shot.txt`), without chain of thought; the answer is
read as `pred.py`'s `extract_answer` reads it ("The correct answer is (X)"), 128 new tokens. Tasks are the
six domains. With a tokenizer and `max_length` (128000 officially) the document loses its middle.
"""

from __future__ import annotations

import re

from ..base import Benchmark, Question
from . import hub
from .metrics import choice_letter

PREFIX = "Please read the following text and answer the question below.\n\n<text>\n"
SUFFIX = "\n</text>"
QUESTION = ("\n\nWhat is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}"
            "\n\nFormat your response as follows: \"The correct answer is (insert answer here)\".")

TASKS = ("single_document_qa", "multi_document_qa", "long_in_context_learning", "long_dialogue_history_understanding",
         "code_repository_understanding", "long_structured_data_understanding")


def domain_task(domain: str) -> str:
    """"Long-dialogue History Understanding" -> "long_dialogue_history_understanding"."""
    return re.sub(r"[^a-z0-9]+", "_", domain.lower()).strip("_")


class LongBenchV2(Benchmark):
    """LongBench v2 (arXiv:2412.15204); `data_files`: a local file in its schema (`_id`, `domain`, `sub_domain`,
    `difficulty`, `length`, `question`, `choice_A`..`choice_D`, `answer`, `context`)."""

    name = "longbench_v2"
    tasks = TASKS
    hub_id = "THUDM/LongBench-v2"
    max_new_tokens = 128

    def __init__(self, tasks: list[str] | None = None, data_files: str | None = None, max_length: int | None = None):
        self.tasks = hub.select_tasks(tasks, TASKS, self.name)
        self.data_files = None if data_files is None else str(data_files)
        self.max_length = max_length

    def samples(self, tokenizer, n=None, seed=0):
        by_task: dict[str, list[hub.Part]] = {task: [] for task in self.tasks}
        for row in hub.load_rows(self.hub_id, None, "train", self.data_files):
            task = domain_task(row["domain"])
            hub.check_task(task, TASKS, self.name)
            if task not in by_task:
                continue
            choices = {letter: row[f"choice_{letter}"] for letter in "ABCD"}
            question = Question(QUESTION.format(question=row["question"], **choices), [row["answer"]],
                                max_new_tokens=self.max_new_tokens, metadata={"choices": choices})
            metadata = {key: row.get(key) for key in ("sub_domain", "difficulty", "length")}
            by_task[task].append(hub.Part(row["_id"], PREFIX, row["context"], SUFFIX, [question], metadata))
        return [sample for task, parts in by_task.items()
                for sample in hub.samples(task, parts, n, seed, tokenizer, self.max_length)]

    def score(self, prediction, question, task):
        hub.check_task(task, TASKS, self.name)
        return 100.0 * (choice_letter(prediction) == question.answers[0])

    def describe(self):
        return {"tasks": list(self.tasks), "data_files": self.data_files, "max_length": self.max_length}
