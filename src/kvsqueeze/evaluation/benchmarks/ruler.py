"""RULER's synthetic tasks (Hsieh et al. 2024, arXiv:2404.06654), generated locally for any tokenizer and length.

Thirteen tasks in the paper; the eleven synthetic ones are here (the two QA tasks need SQuAD and HotpotQA):
eight needle-in-a-haystack variants, variable tracking (vt), common words extraction (cwe) and frequent
words extraction (fwe). As in RULER, `length` is the whole sequence: the prompt (chat template, context,
question, answer prefix) plus the task's answer budget (`max_new_tokens`) fit in it; the context is filled
until the next piece of haystack would not fit. The haystacks are the bundled essays (RULER uses Paul
Graham's) and the repeated "The grass is green..." noise; keys are adjective-noun pairs (RULER draws them
from the wonderwords lists) and cwe's words come from the essays' vocabulary.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from itertools import groupby

from ...prompt import Prompt
from ..base import Benchmark, Question, Sample
from ..needle import essays, haystack, split_sentences

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kinds} for {key} is: {value}."
DEPTHS = 40  # needles go at distinct depths among 40 evenly spaced ones, as in RULER
DEFAULT_SAMPLES = 500  # per task, as in RULER

ADJECTIVES = ("ancient bitter brave calm clever crimson curious damp distant dusty eager faint fierce frozen gentle "
              "giant golden hollow humble icy jolly lazy lively lonely loud lucky mellow misty noble odd pale polite "
              "proud quick quiet rapid rough rusty scarlet shy silent sleepy smooth sour steady sturdy swift tame "
              "tender tidy tiny vast violet wary wild windy wise").split()
NOUNS = ("anchor apple badger barrel beacon blanket bottle canyon castle cedar comet cottage crater dolphin engine "
         "falcon feather fiddle garden glacier hammer harbor helmet island jacket kettle ladder lantern lemon meadow "
         "mirror needle otter palace pebble pepper pillow puzzle quarry rabbit ribbon river saddle salmon shovel "
         "spider teapot thunder tiger tulip valley violin walnut whistle window").split()


@dataclass(frozen=True)
class Niah:
    """One of RULER's needle-in-a-haystack variants (arXiv:2404.06654): where the needles hide, what keys and
    values look like, how many."""

    haystack: str  # "noise" (repeated sentences), "essay", or "needles" (lines shaped like the needle)
    key_kind: str = "words"  # "words" (adjective-noun) or "uuids"
    value_kind: str = "numbers"  # "numbers" (7 digits) or "uuids"
    keys: int = 1  # needles with distinct keys
    values: int = 1  # values per key
    queries: int = 1  # keys asked at once


NIAH = {
    "niah_single_1": Niah("noise"),
    "niah_single_2": Niah("essay"),
    "niah_single_3": Niah("essay", value_kind="uuids"),
    "niah_multikey_1": Niah("essay", keys=4),
    "niah_multikey_2": Niah("needles"),
    "niah_multikey_3": Niah("needles", key_kind="uuids", value_kind="uuids"),
    "niah_multivalue": Niah("essay", values=4),
    "niah_multiquery": Niah("essay", keys=4, queries=4),
}
TASKS = (*NIAH, "vt", "cwe", "fwe")
MAX_NEW_TOKENS = {**dict.fromkeys(NIAH, 128), "vt": 30, "cwe": 120, "fwe": 50}

VT_INTRO = "Follow the chains of variable assignments hidden in the text below, and keep track of them."
VT_QUESTION = "Question: Which variables are assigned the value {value} in the text above? Name every one of them."
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
             "assigned the value {value}, they are:")
CWE_INTRO = ("Here is a numbered list of words. Some of the words occur more often than the others: "
             "remember the ones that occur most often.")
CWE_QUESTION = "Question: Which 10 words occur most often in the list above?"
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_INTRO = ("Read the coded text below and keep count of how often each coded word appears: you will be asked "
             "which three appear most often.")
FWE_QUESTION = ("Question: Ignore the dots '...' and give no explanation. Which three coded words appear most often "
                "in the text above?")
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
ZETA_2 = math.pi ** 2 / 6  # normalises Zipf counts with exponent 2


@dataclass
class Draft:
    """A sample before its size is known: `render(size)` is the context with `size` pieces of haystack; `fit`
    finds the largest size that fits the length, as RULER (arXiv:2404.06654) searches its haystack size."""

    render: Callable[[int], str]
    question: Question
    minimum: int = 1
    maximum: int | None = None
    allowed: Callable[[int], bool] = lambda size: True  # sizes that make a valid sample
    metadata: dict = field(default_factory=dict)


def interleave(items: list, inserts: list, depths: list[float]) -> list:
    """`items` with each insert placed at its depth (0: before the first item, 1: after the last); the depths are
    in increasing order, and inserts at the same place keep their order."""
    out = list(items)
    for position, insert in reversed([(round(d * len(items)), x) for d, x in zip(depths, inserts)]):
        out.insert(position, insert)
    return out


def essay_text(sentences: list[tuple[int, str]], needles: list[str], depths: list[float]) -> str:
    """Essay sentences (tagged with their paragraph) with the needles at their depths, paragraphs kept."""
    tagged = []
    for paragraph, sentence in interleave(sentences, [(None, n) for n in needles], depths):
        previous = tagged[-1][0] if tagged else (sentences[0][0] if sentences else 0)
        tagged.append((previous if paragraph is None else paragraph, sentence))
    return "\n\n".join(" ".join(s for _, s in group) for _, group in groupby(tagged, key=lambda item: item[0]))


def distinct(draw: Callable[[], str], count: int, exclude: set[str] = frozenset()) -> list[str]:
    """`count` different draws, none of them in `exclude`."""
    out: dict[str, None] = {}
    while len(out) < count:
        item = draw()
        if item not in exclude:
            out[item] = None
    return list(out)


def random_key(kind: str, rng: random.Random) -> str:
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_value(kind: str, rng: random.Random) -> str:
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(1_000_000, 9_999_999))


def spoken_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def niah(spec: Niah, rng: random.Random, tokenizer, length: int, max_new_tokens: int) -> Draft:
    keys = distinct(lambda: random_key(spec.key_kind, rng), spec.keys)
    values = [distinct(lambda: random_value(spec.value_kind, rng), spec.values) for _ in keys]
    needles = [NEEDLE.format(kinds=spec.value_kind, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = [d / (DEPTHS - 1) for d in sorted(rng.sample(range(DEPTHS), len(needles)))]
    asked = sorted(rng.sample(range(spec.keys), spec.queries))
    query = spoken_list([keys[i] for i in asked])
    answers = [v for i in asked for v in values[i]]
    kind = spec.value_kind[:-1]
    if len(answers) == 1:
        intro = f"A special magic {kind} is hidden in the text below. Memorize it: I will ask you about it afterwards."
        question = f"What is the special magic {kind} for {query} mentioned in the text above?"
        prefix = f"The special magic {kind} for {query} mentioned in the provided text is"
    else:
        intro = (f"Some special magic {kind}s are hidden in the text below. Memorize them: I will ask you about "
                 "them afterwards.")
        question = f"What are all the special magic {kind}s for {query} mentioned in the text above?"
        prefix = f"The special magic {kind}s for {query} mentioned in the provided text are"
    if spec.haystack == "essay":
        body, maximum = essay_haystack(tokenizer, length, needles, depths, rng.randrange(2 ** 32))
    elif spec.haystack == "noise":
        body, maximum = noise_haystack(needles, depths), None
    else:
        body, maximum = decoy_haystack(spec, keys, needles, depths, random.Random(rng.randrange(2 ** 32))), None
    return Draft(lambda size: intro + "\n" + body(size), Question(question, answers, prefix, max_new_tokens),
                 maximum=maximum, metadata={"depths": depths, "keys": [keys[i] for i in asked]})


def essay_haystack(tokenizer, length: int, needles: list[str], depths: list[float], seed: int):
    """(essay sentences with the needles, as a function of how many sentences; how many there are)."""
    parts = haystack(tokenizer, length, seed)
    sentences = [(i, s) for i, part in enumerate(parts) for s in split_sentences(part)]

    def body(size: int) -> str:
        return essay_text(sentences[:size], needles, depths)

    return body, len(sentences)


def noise_haystack(needles: list[str], depths: list[float]):
    """The noise sentences repeated, one per line, with the needles as lines of their own."""

    def body(size: int) -> str:
        return "\n".join(interleave([NOISE] * size, needles, depths))

    return body


def decoy_haystack(spec: Niah, keys: list[str], needles: list[str], depths: list[float], rng: random.Random):
    """RULER's "needle" haystack: lines shaped like the needles, with other keys, drawn as many as needed."""
    lines: list[str] = []

    def body(size: int) -> str:
        while len(lines) < size:
            key = distinct(lambda: random_key(spec.key_kind, rng), 1, exclude=set(keys))[0]
            lines.append(NEEDLE.format(kinds=spec.value_kind, key=key, value=random_value(spec.value_kind, rng)))
        return "\n".join(interleave(lines[:size], needles, depths))

    return body


def variable_names(rng: random.Random, count: int, letters: int) -> list[str]:
    return distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=letters)), count)


def assignments(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]


def variable_tracking(rng: random.Random, hops: int = 4, example_noise: int = 8) -> Draft:
    """One chain of `hops` + 1 variables in noise, after a short solved example (RULER's one-shot)."""
    value, example_value = (str(v) for v in rng.sample(range(10_000, 100_000), 2))
    example_names = variable_names(rng, hops + 1, 3)
    names = variable_names(rng, hops + 1, 5)
    example_chain = assignments(example_names, example_value)
    example_lines = interleave([NOISE] * example_noise, example_chain,
                               sorted(rng.random() for _ in example_chain))
    example = (VT_INTRO + "\n" + "\n".join(example_lines) + "\n" + VT_QUESTION.format(value=example_value) + " "
               + VT_PREFIX.format(count=hops + 1, value=example_value) + " " + " ".join(example_names))
    chain = assignments(names, value)
    depths = sorted(rng.random() for _ in chain)
    question = Question(VT_QUESTION.format(value=value), names, VT_PREFIX.format(count=hops + 1, value=value),
                        MAX_NEW_TOKENS["vt"])

    def render(size: int) -> str:
        return example + "\n\n" + VT_INTRO + "\n" + "\n".join(interleave([NOISE] * size, chain, depths))

    return Draft(render, question, metadata={"depths": depths})


@lru_cache
def vocabulary() -> tuple[str, ...]:
    """Distinct words of four letters or more from the bundled essays, sorted."""
    return tuple(sorted({w for essay in essays() for w in re.findall(r"[a-z]+", essay.lower()) if len(w) >= 4}))


def word_pool(rng: random.Random, count: int) -> list[str]:
    """`count` distinct words in a random order: the essays' vocabulary, then hyphenated pairs of its words."""
    words = list(vocabulary())
    rng.shuffle(words)
    known = set(words)
    while len(words) < count:
        pair = f"{rng.choice(vocabulary())}-{rng.choice(vocabulary())}"
        if pair not in known:
            known.add(pair)
            words.append(pair)
    return words[:count]


def numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def word_list(words: list[str], common: int, rare: int, rng: random.Random) -> str:
    """The first 10 words `common` times each and the rest `rare` times, shuffled, numbered."""
    entries = words[:10] * common + words[10:] * rare
    rng.shuffle(entries)
    return numbered(entries)


def common_words(rng: random.Random, length: int) -> Draft:
    """RULER's frequencies: 30 and 3 repeats (6 and 1 below 4096 tokens), after a solved example."""
    frequencies = (30, 3, 40, 10, 3) if length >= 4096 else (6, 1, 20, 3, 1)
    common, rare, example_size, example_common, example_rare = frequencies
    words = word_pool(rng, example_size + max(11, length // 3))
    example_words, words = words[:example_size], words[example_size:]
    example = (CWE_INTRO + "\n" + word_list(example_words, example_common, example_rare, rng) + "\n" + CWE_QUESTION
               + " " + CWE_PREFIX + " " + numbered(example_words[:10]))
    shuffle_seed = rng.randrange(2 ** 32)

    def render(size: int) -> str:
        entries = word_list(words[:size], common, rare, random.Random(f"{shuffle_seed}/{size}"))
        return example + "\n\n" + CWE_INTRO + "\n" + entries

    question = Question(CWE_QUESTION, words[:10], CWE_PREFIX, MAX_NEW_TOKENS["cwe"])
    return Draft(render, question, minimum=11, maximum=len(words), metadata={"common": common, "rare": rare})


def zipf_counts(total: int, vocabulary_size: int) -> list[int]:
    """How often the word of each rank appears among about `total` words, Zipf's law with exponent 2."""
    return [int(total / (rank * rank * ZETA_2)) for rank in range(1, vocabulary_size + 1)]


def frequent_words(rng: random.Random, length: int, letters: int = 6) -> Draft:
    """Coded words with Zipf frequencies; the most frequent is the noise "...", the next three are the answer."""
    vocabulary_size = max(10, length // 50)
    coded = ["..."] + distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=letters)), vocabulary_size - 1)
    shuffle_seed = rng.randrange(2 ** 32)

    def render(size: int) -> str:
        text = [word for word, count in zip(coded, zipf_counts(size, vocabulary_size)) for _ in range(count)]
        random.Random(f"{shuffle_seed}/{size}").shuffle(text)
        return FWE_INTRO + "\n" + " ".join(text)

    def separated(size: int) -> bool:  # the three answers occur more often than every other coded word
        counts = zipf_counts(size, vocabulary_size)
        return counts[3] > counts[4]

    question = Question(FWE_QUESTION, coded[1:4], FWE_PREFIX, MAX_NEW_TOKENS["fwe"])
    return Draft(render, question, minimum=27, allowed=separated)


def fit(draft: Draft, prompt: Prompt, length: int, guess: int | None = None) -> tuple[int, int]:
    """(the largest size whose prompt and answer budget fit in `length` tokens, the tokens they take).

    Secant steps from `guess` (e.g. the size of the previous sample) land within a piece or two of it, so only
    a few renderings are tokenized; a search around that point then finds the exact largest size.
    """
    question = draft.question
    reserved = prompt.question_ids(question.text, question.answer_prefix).shape[1] + question.max_new_tokens
    largest = draft.maximum if draft.maximum is not None else draft.minimum + 4 * length

    @cache
    def tokens(size: int) -> int:
        return prompt.context_ids(draft.render(size)).shape[1] + reserved

    def fits(size: int) -> bool:
        return size <= largest and draft.allowed(size) and tokens(size) <= length

    low = draft.minimum
    if not fits(low):
        raise ValueError(f"a length of {length} tokens is too small: the shortest prompt of this task takes "
                         f"{tokens(low)} tokens with this tokenizer, its answer budget included")
    before, size = low, min(largest, max(low + 1, guess or low + 16))
    for _ in range(3):
        if size == before or tokens(size) == tokens(before):
            break
        slope = (size - before) / (tokens(size) - tokens(before))
        before, size = size, min(largest, max(low, round(size + (length - tokens(size)) * slope)))
    step = 1
    if fits(size):
        low = size
        while fits(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        high = size
        while high - step > low and not fits(high - step):
            high, step = high - step, step * 2
        low = max(low, high - step)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, tokens(low)


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's metric: the share of the references found in the prediction (case-insensitive), in percent."""
    found = prediction.lower()
    return 100.0 * sum(answer.lower() in found for answer in answers) / len(answers)


class Ruler(Benchmark):
    """RULER (Hsieh et al. 2024, arXiv:2404.06654): its 11 synthetic tasks at any `length` in tokens.

    `samples(tokenizer, n, seed)` makes `n` samples per task (500, as in RULER, when n is None), ids
    f"{task}-{i}", one question each; the same seed gives the same samples. `score` is RULER's
    string_match_all: the share of the references the prediction contains, ×100.
    """

    name = "ruler"
    tasks = TASKS

    def __init__(self, length: int = 4096, tasks: list[str] | str | None = None):
        selected = [tasks] if isinstance(tasks, str) else list(tasks or TASKS)
        unknown = [task for task in selected if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; available: {', '.join(TASKS)}")
        if length < 1:
            raise ValueError(f"length must be a positive number of tokens; got {length}")
        self.length = length
        self.tasks = tuple(selected)

    def draft(self, task: str, rng: random.Random, tokenizer) -> Draft:
        if task in NIAH:
            return niah(NIAH[task], rng, tokenizer, self.length, MAX_NEW_TOKENS[task])
        if task == "vt":
            return variable_tracking(rng)
        if task == "cwe":
            return common_words(rng, self.length)
        return frequent_words(rng, self.length)

    def samples(self, tokenizer, n: int | None = None, seed: int = 0) -> list[Sample]:
        prompt = Prompt.for_tokenizer(tokenizer)
        out = []
        for task in self.tasks:
            size = None
            for i in range(DEFAULT_SAMPLES if n is None else n):
                draft = self.draft(task, random.Random(f"ruler/{task}/{seed}/{i}"), tokenizer)
                try:
                    size, tokens = fit(draft, prompt, self.length, guess=size)
                except ValueError as error:
                    raise ValueError(f"RULER {task}: {error}") from None
                out.append(Sample(f"{task}-{i}", task, draft.render(size), [draft.question],
                                  {"length": self.length, "tokens": tokens, "size": size} | draft.metadata))
        return out

    def score(self, prediction: str, question: Question, task: str) -> float:
        if task not in TASKS:
            raise ValueError(f"unknown RULER task {task!r}; available: {', '.join(TASKS)}")
        return string_match_all(prediction, question.answers)

    def describe(self) -> dict:
        return {"length": self.length, "tasks": list(self.tasks)}
