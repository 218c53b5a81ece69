"""What a benchmark is for `kvsqueeze eval`: samples (a context and its questions) and a metric.

The protocol is query-agnostic by default: each sample's context is compressed once, then every one of
its questions is asked on the same compressed context (restored between questions). A benchmark only
says what the samples are and how an answer is scored; running, sweeping and saving is the runner's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

REGISTRY: dict[str, type["Benchmark"]] = {}


@dataclass
class Question:
    """One question about a sample's context, with its reference answers."""

    text: str  # asked after the context, in the user turn
    answers: list[str]  # references the metric compares the prediction with
    answer_prefix: str = ""  # the start of the assistant's answer, given to the model
    max_new_tokens: int = 64
    metadata: dict = field(default_factory=dict)  # e.g. the choices of a multiple-choice question
    # the next step, from this one's answer: a question asked alone (without the context), whose answer is the one
    # scored, against this question's references (LongBench v2's chain of thought: reasoning on the context, then
    # the answer)
    then: Callable[[str], "Question"] | None = field(default=None, repr=False)


@dataclass
class Sample:
    """A context and the questions asked about it."""

    id: str  # unique within the benchmark (with the task): how a resumed sweep knows it is done
    task: str  # the sub-task (RULER's "niah_single_1", LongBench's "narrativeqa"...)
    context: str
    questions: list[Question]
    metadata: dict = field(default_factory=dict)
    chat_template: bool = True  # False: the bare prompt, as official code feeds few-shot and code completion tasks


class Benchmark:
    """Base of all benchmarks. Subclasses set `name`, implement `samples` and `score`.

    `samples(tokenizer, n, seed)` returns up to `n` samples per task (all of them when n is None);
    synthetic benchmarks generate them for the tokenizer and a `length` in tokens, hub ones load them
    through `datasets` (or from a local file in the dataset's own schema, `data_files=`).
    `score(prediction, question, task)` is the benchmark's official metric for one answer, in [0, 100].
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def samples(self, tokenizer, n: int | None = None, seed: int = 0) -> list[Sample]:
        raise NotImplementedError

    def score(self, prediction: str, question: Question, task: str) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        """The settings that change the samples (length, tasks, files...), recorded with every result."""
        return {}
