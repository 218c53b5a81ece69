"""Needle in a haystack over a grid of context lengths and depths, generated locally (no download)."""

from __future__ import annotations

from ..base import Benchmark, Question, Sample
from ..needle import needle_sample


class NeedleGrid(Benchmark):
    """One 7-digit number hidden in essay text at each (length, depth) of a grid; found when the answer contains it.

    The needle-in-a-haystack test popularised by G. Kamradt (2023) and used by every KV-cache paper
    (e.g. SnapKV, arXiv:2404.14469). Tasks are the lengths; `samples` gives, per length, `n` haystacks at
    depths spread evenly from the start (0) to the end (1), or the given `depths`.
    """

    name = "needle"

    def __init__(self, lengths: list[int] | int = (1000, 2000, 4000), depths: list[float] | None = None):
        self.lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        self.depths = None if depths is None else list(depths)
        if not self.lengths or min(self.lengths) < 64:
            raise ValueError(f"needle contexts need at least 64 tokens; got lengths {self.lengths}")

    @property
    def tasks(self):
        return tuple(str(n) for n in self.lengths)

    def samples(self, tokenizer, n=None, seed=0):
        out = []
        for length in self.lengths:
            depths = self.depths or [i / max((n or 10) - 1, 1) for i in range(n or 10)]
            for i, depth in enumerate(depths):
                needle = needle_sample(tokenizer, length, depth, seed=seed + i)
                question = Question(needle.question, [needle.answer], max_new_tokens=24)
                out.append(Sample(f"{length}-{i}", str(length), needle.context, [question], {"depth": depth}))
        return out

    def score(self, prediction, question, task):
        return 100.0 * (question.answers[0] in prediction)

    def describe(self):
        return {"lengths": self.lengths, "depths": self.depths}
