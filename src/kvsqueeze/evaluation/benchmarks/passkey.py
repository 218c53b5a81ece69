"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300), generated locally for any tokenizer and length.

A five-digit pass key stated in one line, hidden at a chosen depth in the repeated filler "The grass is
green. The sky is blue...". As in RULER, `length` is the whole sequence: the prompt and the answer budget
fit in it, and the filler is repeated until one more repetition would not fit.
"""

from __future__ import annotations

import random

from ...prompt import Prompt
from ..base import Benchmark, Question, Sample
from .ruler import NOISE, Draft, fit

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it: I will ask you about it afterwards.")
DEFAULT_SAMPLES = 10


def passkey_draft(key: str, depth: float) -> Draft:
    """The filler repeated `size` times, the pass key line after round(depth * size) of them."""
    line = f"The pass key is {key}. Remember it. {key} is the pass key."

    def render(size: int) -> str:
        before = round(depth * size)
        parts = [INTRO, " ".join([NOISE] * before), line, " ".join([NOISE] * (size - before))]
        return "\n".join(part for part in parts if part)

    return Draft(render, Question("What is the pass key?", [key], "The pass key is", max_new_tokens=16),
                 metadata={"depth": depth})


class Passkey(Benchmark):
    """Passkey retrieval (Mohtashami & Jaggi 2023, arXiv:2305.16300): found when the answer contains the key.

    `samples(tokenizer, n, seed)`: without `depths`, `n` samples (10 when n is None) at depths spread evenly
    from 0 (the start) to 1 (the end); with `depths`, sample i is at depths[i % len(depths)] (n defaults
    to one per depth). Ids are f"passkey-{i}"; the same seed gives the same keys.
    """

    name = "passkey"
    tasks = ("passkey",)

    def __init__(self, length: int = 4096, depths: list[float] | None = None):
        if depths is not None and (not depths or any(not 0 <= d <= 1 for d in depths)):
            raise ValueError(f"depths must be a non-empty list of numbers in [0, 1]; got {depths}")
        if length < 1:
            raise ValueError(f"length must be a positive number of tokens; got {length}")
        self.length = length
        self.depths = None if depths is None else list(depths)

    def samples(self, tokenizer, n: int | None = None, seed: int = 0) -> list[Sample]:
        if self.depths is None:
            count = DEFAULT_SAMPLES if n is None else n
            depths = [i / max(count - 1, 1) for i in range(count)]
        else:
            count = len(self.depths) if n is None else n
            depths = [self.depths[i % len(self.depths)] for i in range(count)]
        prompt = Prompt.for_tokenizer(tokenizer)
        out, size = [], None
        for i, depth in enumerate(depths):
            key = str(random.Random(f"passkey/{seed}/{i}").randint(10_000, 99_999))
            draft = passkey_draft(key, depth)
            try:
                size, tokens = fit(draft, prompt, self.length, guess=size)
            except ValueError as error:
                raise ValueError(f"passkey: {error}") from None
            out.append(Sample(f"passkey-{i}", "passkey", draft.render(size), [draft.question],
                              {"length": self.length, "tokens": tokens, "size": size} | draft.metadata))
        return out

    def score(self, prediction: str, question: Question, task: str) -> float:
        return 100.0 * (question.answers[0] in prediction)

    def describe(self) -> dict:
        return {"length": self.length, "depths": self.depths}
