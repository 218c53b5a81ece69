"""MATH-500: the 500 MATH test problems of "Let's Verify Step by Step" (Lightman et al., arXiv:2305.20050;
MATH: Hendrycks et al., arXiv:2103.03874), from "HuggingFaceH4/MATH-500" (split "test").

The context is the problem, the question the instruction to reason step by step and box the answer; the
last \\boxed{} (else the last number) is compared with the reference after MATH's answer normalisation.
"""

from __future__ import annotations

from ..base import Benchmark, Question, Sample
from . import hub
from .aime25 import INSTRUCTION
from .metrics import final_answer, math_equal


class Math500(Benchmark):
    """MATH-500 (arXiv:2305.20050); `data_files`: a local file in its schema (`problem`, `solution`, `answer`, `subject`, `level`,
    `unique_id`)."""

    name = "math500"
    tasks = ("math500",)
    hub_id = "HuggingFaceH4/MATH-500"

    def __init__(self, data_files: str | None = None, max_new_tokens: int = 32768):
        self.data_files = None if data_files is None else str(data_files)
        self.max_new_tokens = max_new_tokens

    def samples(self, tokenizer, n=None, seed=0):
        rows = hub.load_rows(self.hub_id, None, "test", self.data_files)
        return hub.choose([Sample(str(row.get("unique_id") or i), "math500", row["problem"],
                                  [Question(INSTRUCTION, [str(row["answer"])], max_new_tokens=self.max_new_tokens)],
                                  {"subject": row.get("subject"), "level": row.get("level")})
                           for i, row in enumerate(rows)], n, seed)

    def score(self, prediction, question, task):
        hub.check_task(task, self.tasks, self.name)
        return 100.0 * math_equal(final_answer(prediction), question.answers[0])

    def describe(self):
        return {"data_files": self.data_files, "max_new_tokens": self.max_new_tokens}
