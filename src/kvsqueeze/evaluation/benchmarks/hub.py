"""What the hub benchmarks share: loading rows (from the hub or a local file in the dataset's schema),
choosing tasks and samples, grouping questions on one context, and cutting contexts to a token budget."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterable

from ..base import Benchmark, Question, Sample


class HubBenchmark(Benchmark):
    """A benchmark read from the hub, or from local files in its schema: `tasks` (a subset of the class's),
    `data_files` (a path for one task, or {task: path}), `max_length` (the token budget contexts are cut to)."""

    def __init__(self, tasks: list[str] | None = None, data_files: str | dict | None = None,
                 max_length: int | None = None):
        self.files = task_files(tasks, data_files, type(self).tasks, self.name)
        self.tasks = tuple(self.files)
        self.max_length = max_length


def load_rows(hub_id: str, config: str | None, split: str, data_files: str | None = None, **kwargs) -> list[dict]:
    """The rows of a hub dataset, or of a local JSON / JSON lines file in the same schema (`data_files`)."""
    try:
        import datasets
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("hub benchmarks need `datasets`: pip install 'kvsqueeze[eval]'") from error
    if data_files is not None:
        return list(datasets.load_dataset("json", data_files=str(data_files), split="train", **kwargs))
    return list(datasets.load_dataset(hub_id, config, split=split, **kwargs))


def check_task(task: str, valid: Iterable[str], benchmark: str) -> None:
    valid = tuple(valid)
    if task not in valid:
        raise ValueError(f"unknown {benchmark} task {task!r}; valid tasks: {', '.join(valid)}")


def select_tasks(tasks: Iterable[str] | str | None, valid: tuple[str, ...], benchmark: str) -> tuple[str, ...]:
    """The chosen tasks (all of them when None), each checked against the benchmark's list."""
    if tasks is None:
        return valid
    chosen = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    for task in chosen:
        check_task(task, valid, benchmark)
    return chosen


def task_files(tasks: Iterable[str] | str | None, data_files: str | dict | None, valid: tuple[str, ...],
               benchmark: str) -> dict[str, str | None]:
    """chosen task -> its local file (None: the hub). The tasks are all the valid ones when None (those of a
    {task: path} dict when one is given); a single path serves a single task."""
    if tasks is None and isinstance(data_files, dict):
        tasks = list(data_files)
    chosen = select_tasks(tasks, valid, benchmark)
    if data_files is None:
        return dict.fromkeys(chosen)
    if isinstance(data_files, dict):
        for task in data_files:
            check_task(task, chosen, benchmark)
        return {task: None if data_files.get(task) is None else str(data_files[task]) for task in chosen}
    if len(chosen) != 1:
        raise ValueError(f"{benchmark}: one data file for {len(chosen)} tasks; choose one task (tasks=[...]) "
                         "or give data_files={task: path}")
    return {chosen[0]: str(data_files)}


@dataclass
class Part:
    """One row as a sample to be: its context is prefix + document + suffix, the document cut to size later."""

    id: str
    prefix: str
    document: str
    suffix: str
    questions: list[Question]
    metadata: dict = field(default_factory=dict)


def group(parts: Iterable[Part]) -> list[Part]:
    """The rows asking about the same context merged into one, their questions together, in dataset order."""
    merged: dict[tuple[str, str, str], Part] = {}
    for part in parts:
        key = (part.prefix, part.document, part.suffix)
        if key in merged:
            merged[key].questions.extend(part.questions)
        else:
            merged[key] = part
    return list(merged.values())


def choose(items: list, n: int | None, seed: int) -> list:
    """Up to `n` items drawn with `seed`, in their dataset order (all of them when n is None)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def build(task: str, parts: list[Part], tokenizer=None, max_length: int | None = None, keep: str = "middle",
          marker: str = "") -> list[Sample]:
    """The samples, each document cut (see `fit`) so that its prompt fits `max_length` tokens."""
    return [Sample(part.id, task, part.prefix + fit(tokenizer, max_length, part.prefix + part.suffix, part.document,
                                                    part.questions, keep, marker) + part.suffix,
                   part.questions, part.metadata) for part in parts]


def samples(task: str, parts: Iterable[Part], n: int | None, seed: int, tokenizer=None, max_length: int | None = None,
            keep: str = "middle", marker: str = "") -> list[Sample]:
    """group, choose, build: the usual way from rows to samples."""
    return build(task, choose(group(parts), n, seed), tokenizer, max_length, keep, marker)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def cut(tokenizer, text: str, max_tokens: int, keep: str = "middle", marker: str = "") -> str:
    """`text` in at most `max_tokens` tokens: its middle removed (LongBench, InfiniteBench, LooGLE), or its end
    (Zero-SCROLLS, which then appends `marker`)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return text
    if keep == "end":
        budget = max(max_tokens - n_tokens(tokenizer, marker), 0)
        return tokenizer.decode(ids[:budget], skip_special_tokens=True) + marker
    head = max_tokens // 2
    tail = max_tokens - head
    return (tokenizer.decode(ids[:head], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - tail:], skip_special_tokens=True))


def fit(tokenizer, max_length: int | None, prefix: str, document: str, questions: list[Question],
        keep: str = "middle", marker: str = "") -> str:
    """The document cut so that prefix + document + the longest question fits `max_length` tokens (the whole
    prompt, as the benchmarks' scripts cut it); unchanged without a tokenizer or a `max_length`."""
    if tokenizer is None or max_length is None:
        return document
    longest = max((n_tokens(tokenizer, q.text + q.answer_prefix) for q in questions), default=0)
    budget = max_length - n_tokens(tokenizer, prefix) - longest
    if budget <= 0:
        raise ValueError(f"max_length={max_length} leaves no room for the document (prompt without it: "
                         f"{max_length - budget} tokens)")
    return cut(tokenizer, document, budget, keep, marker)
