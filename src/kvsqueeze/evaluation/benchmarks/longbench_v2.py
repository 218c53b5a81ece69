"""LongBench v2: 503 hard multiple-choice questions on 8k-2M word contexts (Bai et al., arXiv:2412.15204),
from "THUDM/LongBench-v2" (split "train", its only one).

The prompt is the official zero-shot one (`prompts/0shot.txt`, 128 new tokens), or with `cot=True` its chain of
thought (`prompts/0shot_cot.txt`, 1,024 new tokens on the compressed context, then `prompts/0shot_cot_ans.txt`
asked alone, the document "omitted", 128 tokens). The answer is read as `pred.py`'s `extract_answer` reads it
("The correct answer is (X)"). Tasks are the six domains. With a tokenizer and `max_length` (128000
officially) the document loses its middle.
"""

from __future__ import annotations

import re

from ..base import Benchmark, Question
from . import hub
from .metrics import choice_letter

PREFIX = "Please read the following text and answer the question below.\n\n<text>\n"
SUFFIX = "\n</text>"
CHOICES = "What is the correct answer to this question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}"
ANSWER_FORMAT = "Format your response as follows: \"The correct answer is (insert answer here)\"."
QUESTION = "\n\n" + CHOICES + "\n\n" + ANSWER_FORMAT
# chain of thought: "questions" (the official templates' wording), the reasoning, then the answer asked alone
COT_PREFIX = PREFIX.replace("the question below", "the questions below")
COT_QUESTION = "\n\n" + CHOICES + "\n\nLet\u2019s think step by step:"
COT_ANSWER = ("Please read the following text and answer the questions below.\n\nThe text is too long and omitted "
              "here.\n\n" + CHOICES + "\n\nLet\u2019s think step by step: {reasoning}\n\nBased on the above, what "
              "is the single, most likely answer choice? " + ANSWER_FORMAT)
COT_TOKENS = 1024

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

    def __init__(self, tasks: list[str] | None = None, data_files: str | None = None, max_length: int | None = None,
                 cot: bool = False):
        self.tasks = hub.select_tasks(tasks, TASKS, self.name)
        self.data_files = None if data_files is None else str(data_files)
        self.max_length, self.cot = max_length, cot

    def question(self, row: dict) -> Question:
        fields = {"question": row["question"].strip()} | {letter: row[f"choice_{letter}"].strip() for letter in "ABCD"}
        answers, metadata = [row["answer"]], {"choices": {letter: fields[letter] for letter in "ABCD"}}
        if not self.cot:
            return Question(QUESTION.format(**fields), answers, max_new_tokens=self.max_new_tokens, metadata=metadata)

        def answer_step(reasoning: str) -> Question:
            return Question(COT_ANSWER.format(**fields, reasoning=reasoning.strip()), answers,
                            max_new_tokens=self.max_new_tokens, metadata=metadata)

        return Question(COT_QUESTION.format(**fields), answers, max_new_tokens=COT_TOKENS, metadata=metadata,
                        then=answer_step)

    def samples(self, tokenizer, n=None, seed=0):
        by_task: dict[str, list[hub.Part]] = {task: [] for task in self.tasks}
        for row in hub.load_rows(self.hub_id, None, "train", self.data_files):
            task = domain_task(row["domain"])
            hub.check_task(task, TASKS, self.name)
            if task not in by_task:
                continue
            metadata = {key: row.get(key) for key in ("sub_domain", "difficulty", "length")}
            by_task[task].append(hub.Part(row["_id"], COT_PREFIX if self.cot else PREFIX, row["context"].strip(),
                                          SUFFIX, [self.question(row)], metadata))
        return [sample for task, parts in by_task.items()
                for sample in hub.samples(task, parts, n, seed, tokenizer, self.max_length)]

    def score(self, prediction, question, task):
        hub.check_task(task, TASKS, self.name)
        return 100.0 * (choice_letter(prediction) == question.answers[0])

    def describe(self):
        return {"tasks": list(self.tasks), "data_files": self.data_files, "max_length": self.max_length, "cot": self.cot}
