"""AIME 2025: the 30 problems of the 2025 American Invitational Mathematics Examination I and II, from
"opencompass/AIME2025" (configs "AIME2025-I" and "AIME2025-II", split "test"), a reasoning benchmark in
the style of DeepSeek-R1's evaluation (arXiv:2501.12948): long generations, where the decoding cache grows.

The context is the problem, the question the usual instruction to reason step by step and box the answer;
the final answer (the last \\boxed{}, else the last number) is right when it is the same integer.
"""

from __future__ import annotations

from ..base import Benchmark, Question, Sample
from . import hub
from .metrics import final_answer, normalize_math

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def same_integer(prediction: str | None, reference: str) -> bool:
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(reference)
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


class AIME25(Benchmark):
    """AIME 2025, evaluated as DeepSeek-R1 (arXiv:2501.12948) reports it; `data_files`: a local file with
    `question` (or `problem`, as in "math-ai/aime25") and `answer` columns."""

    name = "aime25"
    tasks = ("aime25",)
    hub_id = "opencompass/AIME2025"
    configs = ("AIME2025-I", "AIME2025-II")

    def __init__(self, data_files: str | None = None, max_new_tokens: int = 32768):
        self.data_files = None if data_files is None else str(data_files)
        self.max_new_tokens = max_new_tokens

    def rows(self) -> list[tuple[str, dict]]:
        if self.data_files is not None:
            return [(str(row.get("id", i)), row) for i, row in enumerate(hub.load_rows("", None, "", self.data_files))]
        return [(f"{config}-{i + 1}", row) for config in self.configs
                for i, row in enumerate(hub.load_rows(self.hub_id, config, "test"))]

    def samples(self, tokenizer, n=None, seed=0):
        return hub.choose([Sample(id_, "aime25", row.get("question") or row["problem"],
                                  [Question(INSTRUCTION, [str(row["answer"])], max_new_tokens=self.max_new_tokens)])
                           for id_, row in self.rows()], n, seed)

    def score(self, prediction, question, task):
        hub.check_task(task, self.tasks, self.name)
        return 100.0 * same_integer(final_answer(prediction), question.answers[0])

    def describe(self):
        return {"data_files": self.data_files, "max_new_tokens": self.max_new_tokens}
