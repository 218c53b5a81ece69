"""Needle in a haystack, generated locally for any tokenizer and length.

The haystack is made of the bundled essays (original text, no digits in it); one sentence stating a
random number for a random key is inserted at a chosen depth, at a paragraph or sentence boundary.
A prediction is correct when it contains the number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files

KEYS = ["amber lantern", "quiet orchard", "copper kettle", "northern bridge", "silver heron", "paper compass",
        "velvet curtain", "granite stair", "willow basket", "harbour bell", "linen map", "iron gate"]


@lru_cache
def essays() -> list[str]:
    """The bundled filler essays, each a list of paragraphs joined by blank lines."""
    text = files("kvsqueeze").joinpath("data/essays.txt").read_text()
    return [essay.strip() for essay in text.split("=====") if essay.strip()]


def paragraphs(seed: int) -> list[str]:
    """All essay paragraphs, essays in a seed-dependent order, cycled as needed by the caller."""
    order = essays()[:]
    random.Random(seed).shuffle(order)
    return [p.strip() for essay in order for p in essay.split("\n\n") if p.strip()]


@dataclass(frozen=True)
class NeedleSample:
    context: str
    question: str
    answer: str
    depth: float
    n_tokens: int
    needle: str  # the inserted sentence, as it appears in the context

    def correct(self, prediction: str) -> bool:
        return self.answer in prediction


def haystack(tokenizer, n_tokens: int, seed: int = 0) -> list[str]:
    """Paragraphs of filler whose total is about `n_tokens` tokens."""
    pool, chosen, total, i = paragraphs(seed), [], 0, 0
    while total < n_tokens:
        paragraph = pool[i % len(pool)]
        length = len(tokenizer(paragraph + "\n\n", add_special_tokens=False).input_ids)
        if total + length > n_tokens and chosen:
            words = paragraph.split()
            keep = max(1, int(len(words) * (n_tokens - total) / length))
            chosen.append(" ".join(words[:keep]))
            break
        chosen.append(paragraph)
        total += length
        i += 1
    return chosen


def needle_sample(tokenizer, n_tokens: int, depth: float, seed: int = 0) -> NeedleSample:
    """A haystack of about `n_tokens` tokens with one needle at `depth` (0 = start, 1 = end)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1]; got {depth}")
    rng = random.Random(seed)
    key, number = rng.choice(KEYS), str(rng.randint(1_000_000, 9_999_999))
    needle = f"The special magic number for the {key} is {number}."
    parts = haystack(tokenizer, n_tokens - len(tokenizer(needle, add_special_tokens=False).input_ids), seed)
    sentences = [(i, s) for i, paragraph in enumerate(parts) for s in split_sentences(paragraph)]
    cut = round(depth * len(sentences))
    before = sentences[:cut] + [(sentences[cut - 1][0] if cut else 0, needle)] + sentences[cut:]
    text = "\n\n".join(" ".join(s for j, s in before if j == i) for i in range(len(parts)))
    question = f"What is the special magic number for the {key}? Answer with the number only."
    return NeedleSample(text, question, number, depth, n_tokens, needle)


def split_sentences(paragraph: str) -> list[str]:
    out, start = [], 0
    for i, char in enumerate(paragraph):
        if char in ".?!" and (i + 1 == len(paragraph) or paragraph[i + 1] == " "):
            out.append(paragraph[start:i + 1].strip())
            start = i + 1
    if paragraph[start:].strip():
        out.append(paragraph[start:].strip())
    return out
