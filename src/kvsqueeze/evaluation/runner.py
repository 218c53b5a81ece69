"""Sweeps: every (method, ratio, quantizer) configuration over a benchmark's samples, resumable, as JSON lines.

One row per answered question, with the prediction, the references, the score, the compression really
measured (bytes held, tokens kept) and the run's metadata (package versions, git commit, arguments,
hardware). A sweep that is run again skips every row its output file already has, so an interrupted
sweep finishes without redoing anything; `shard=(i, n)` takes every n-th sample from the i-th, so a
sweep spread over machines writes rows that `read_results` merges (duplicates dropped).
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..prompt import Prompt
from .base import Benchmark, Question, Sample


@dataclass(frozen=True)
class Configuration:
    """A method spec ("full" for the uncompressed cache), a ratio (None for methods without one), a quantizer."""

    method: str = "full"
    ratio: float | None = None
    quant: str | None = None

    @property
    def label(self) -> str:
        parts = [self.method] + ([f"ratio={self.ratio}"] if self.ratio is not None else [])
        return " ".join(parts + ([f"+{self.quant}"] if self.quant else []))

    def build(self):
        from .. import methods

        return None if self.method == "full" else methods.build(self.method, self.ratio)


def configurations(method_specs: list[str], ratios: list[float], quants: list[str | None]) -> list[Configuration]:
    """The sweep's grid: every method at every ratio (methods without a ratio once), each with every quantizer.
    The full cache comes once per quantizer."""
    import inspect

    from .. import methods

    grid = []
    for spec in method_specs:
        name = spec.partition(":")[0]
        takes_ratio = name != "full" and "ratio" in inspect.signature(methods.available()[name]).parameters
        if name != "full" and name not in methods.available():
            raise methods.UnknownMethodError(f"unknown method {name!r}; available: {', '.join(methods.available())}")
        for ratio in (ratios if takes_ratio else [None]):
            grid.extend(Configuration(spec, ratio, quant) for quant in quants)
    return grid


def row_key(row: dict) -> tuple:
    return (row["benchmark"], row["task"], row["sample"], row["question"], row["method"], row["ratio"], row["quant"])


def read_results(*paths: str | Path) -> list[dict]:
    """The rows of one or more result files (shards), each row once."""
    rows = {}
    for path in paths:
        path = Path(path)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(row_key(row), row)
    return list(rows.values())


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def run_metadata(arguments: dict) -> dict:
    """What a result depends on besides its configuration: versions, commit, hardware, arguments."""
    versions = {}
    for package in ("kvsqueeze", "torch", "transformers", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {cpu_name()}"
    return {"versions": versions, "commit": commit, "device": device, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "arguments": arguments}


def compressed(model, tokenizer, text: str, configurations: list[Configuration], check_window: bool = True,
               share_prefill: bool = True, chunk_size: int | None = None, chat_template: bool = True,
               errors: str = "raise") -> list:
    """`text` compressed under each configuration. With `share_prefill`, one prefill serves every method that
    does not change the prefill itself (see `kvsqueeze.branches`): the same caches, one prefill instead of many.
    A chunked prefill (`chunk_size`) compresses as it goes, so each configuration gets its own. With
    `errors="return"`, a configuration that raises gets its exception in its place and the others go on."""
    from ..branches import compress_each, shares_prefill
    from ..pipeline import compress

    methods = [c.build() for c in configurations]
    share_prefill = share_prefill and chunk_size is None
    shared = [i for i, m in enumerate(methods) if share_prefill and shares_prefill(m)]
    contexts = {}
    if len(shared) > 1:
        contexts = dict(zip(shared, compress_each(model, tokenizer, text, [methods[i] for i in shared],
                                                  quantizers=[configurations[i].quant for i in shared],
                                                  check_window=check_window, chat_template=chat_template,
                                                  errors=errors)))
    for i, (method, configuration) in enumerate(zip(methods, configurations)):
        if i not in contexts:
            try:
                contexts[i] = compress(model, tokenizer, text, method, quantizer=configuration.quant,
                                       check_window=check_window, chunk_size=chunk_size, chat_template=chat_template)
            except Exception as error:
                if errors != "return":
                    raise
                contexts[i] = error
    return [contexts[i] for i in range(len(configurations))]


@dataclass
class Answered:
    """One question answered under one configuration: the prediction (the last step's), the earlier steps'
    answers and the compression measured, or the exception that stopped the configuration."""

    configuration: Configuration
    question: int
    prediction: str | None = None
    steps: list[str] = field(default_factory=list)
    stats: object = None
    error: Exception | None = None


def answer(model, tokenizer, sample: Sample, configurations: list[Configuration], query_aware: bool,
           check_window: bool, share_prefill: bool = True, errors: str = "raise"):
    """Yields an `Answered` for every question of `sample` under every configuration, as each answer comes.

    Query-agnostic: the context is compressed once and every question asked on it. Query-aware: each
    question is appended to the context before compression, so the method sees it. A question's next steps
    (`Question.then`) are asked alone, each from the previous answer; the last answer is the prediction.
    With `errors="return"`, a configuration that raises yields its exception (`Answered.error`) and the others go on.
    """
    from ..pipeline import compress

    def with_steps(question: Question, first: str) -> tuple[str, list[str]]:
        steps = [first]
        while question.then is not None:
            question = question.then(steps[-1])
            header = Prompt.for_tokenizer(tokenizer, sample.chat_template).context_ids("")  # the prompt's header only
            alone = compress(model, tokenizer, header, chat_template=sample.chat_template)
            steps.append(alone.ask(question.text, answer_prefix=question.answer_prefix,
                                   max_new_tokens=question.max_new_tokens))
        return steps[-1], steps[:-1]

    def answered(configuration, i, ctx, ask) -> Answered:
        question = sample.questions[i]
        if isinstance(ctx, Exception):  # its compression raised (errors="return")
            return Answered(configuration, i, error=ctx)
        try:
            prediction, steps = with_steps(question, ask(ctx, question))
            return Answered(configuration, i, prediction, steps, ctx.stats)
        except Exception as error:
            if errors != "return":
                raise
            return Answered(configuration, i, error=error)

    def compressed_for(text):
        return compressed(model, tokenizer, text, configurations, check_window, share_prefill,
                          chat_template=sample.chat_template, errors=errors)

    if not query_aware:
        asked = lambda ctx, q: ctx.ask(q.text, answer_prefix=q.answer_prefix, max_new_tokens=q.max_new_tokens)
        for configuration, ctx in zip(configurations, compressed_for(sample.context)):
            for i in range(len(sample.questions)):
                yield answered(configuration, i, ctx, asked)
        return
    appended = lambda ctx, q: ctx.answer(answer_prefix=q.answer_prefix, max_new_tokens=q.max_new_tokens)
    for i, q in enumerate(sample.questions):
        for configuration, ctx in zip(configurations, compressed_for(sample.context + "\n\n" + q.text)):
            yield answered(configuration, i, ctx, appended)


def errors_path(out: str | Path) -> Path:
    """Where a sweep writing its rows to `out` records the configurations that raised: `NAME.errors.jsonl`."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".errors.jsonl")


def read_errors(out: str | Path) -> dict[tuple, str]:
    """{(method, ratio, quant): the last error recorded} for the configurations of the sweep writing to `out`
    that raised and still have no result (a later run that succeeded clears them)."""
    path = errors_path(out)
    if not path.exists():
        return {}
    answered = {(row["method"], row["ratio"], row["quant"]) for row in read_results(out)}
    last = {}
    for row in map(json.loads, path.open()):
        last[(row["method"], row["ratio"], row["quant"])] = row["error"]
    return {key: error for key, error in last.items() if key not in answered}


def sweep(model, tokenizer, benchmark: Benchmark, grid: list[Configuration], out: str | Path, *,
          samples: int | None = None, seed: int = 0, shard: tuple[int, int] = (0, 1), query_aware: bool = False,
          metadata: dict | None = None, check_window: bool = True, progress: bool = True,
          share_prefill: bool = True, errors: str = "raise") -> list[dict]:
    """Answer every question of the benchmark's samples under every configuration; append rows to `out`.

    Rows already in `out` are skipped. Returns the rows written by this call. Each sample is prefilled once
    for all the configurations it still needs (`share_prefill=False`: once per configuration, e.g. to bound
    memory when many configurations would hold their caches at once). A configuration that raises stops the
    sweep (`errors="raise"`), or, with `errors="record"`, gets a row in `errors_path(out)` (the error, the sample)
    and the others go on; a later run retries it.
    """
    if errors not in ("raise", "record"):
        raise ValueError(f"errors={errors!r}: 'raise' or 'record'")
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in [0, {count})")
    torch.manual_seed(seed)
    chosen = benchmark.samples(tokenizer, samples, seed)[index::count]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {row_key(row) for row in read_results(out)}
    metadata = metadata or run_metadata({})
    written = []
    def missing(configuration, sample):
        return any((benchmark.name, sample.task, sample.id, i, configuration.method, configuration.ratio,
                    configuration.quant) not in done for i in range(len(sample.questions)))

    work = [(sample, [c for c in grid if missing(c, sample)]) for sample in chosen]
    work = [(sample, todo) for sample, todo in work if todo]
    method_settings = {c: {} if c.method == "full" else c.build().settings() for c in grid}
    failed = set()  # (configuration, sample id): one error row each
    with out.open("a") as file:
        for sample, todo in tqdm(work, desc=f"{benchmark.name}", disable=not progress):
            for result in answer(model, tokenizer, sample, todo, query_aware, check_window, share_prefill,
                                 "return" if errors == "record" else "raise"):
                configuration, question = result.configuration, sample.questions[result.question]
                where = {"benchmark": benchmark.name, "task": sample.task, "sample": sample.id,
                         "question": result.question, "method": configuration.method, "ratio": configuration.ratio,
                         "quant": configuration.quant}
                if result.error is not None:
                    if (configuration, sample.id) not in failed:
                        failed.add((configuration, sample.id))
                        with errors_path(out).open("a") as log:
                            log.write(json.dumps(where | {"error": f"{type(result.error).__name__}: {result.error}",
                                                          "run": metadata}) + "\n")
                    continue
                stats = result.stats
                row = where | {
                    "method_settings": method_settings[configuration], "query_aware": query_aware,
                    "prediction": result.prediction, "answers": question.answers,
                    "score": benchmark.score(result.prediction, question, sample.task),
                    "context_tokens": stats.context_tokens, "compression_ratio": stats.compression_ratio,
                    "bytes_held": stats.bytes_held, "bytes_uncompressed": stats.bytes_uncompressed,
                    "seconds": stats.seconds, "metadata": sample.metadata, "settings": benchmark.describe(),
                    "run": metadata} | ({"steps": result.steps} if result.steps else {})
                if row_key(row) in done:
                    continue
                file.write(json.dumps(row) + "\n")
                file.flush()
                written.append(row)
    return written


def summary(rows: list[dict]) -> dict:
    """{(method, ratio, quant): {task: mean score, "average": mean over tasks, "bytes": mean bytes share}}."""
    groups: dict[tuple, dict[str, list]] = {}
    for row in rows:
        key = (row["method"], row["ratio"], row["quant"])
        groups.setdefault(key, {}).setdefault(row["task"], []).append(row)
    table = {}
    for key, tasks in groups.items():
        scores = {task: sum(r["score"] for r in rs) / len(rs) for task, rs in sorted(tasks.items())}
        every = [r for rs in tasks.values() for r in rs]
        table[key] = scores | {"average": sum(scores.values()) / len(scores),
                               "bytes": sum(r["bytes_held"] / r["bytes_uncompressed"] for r in every) / len(every),
                               "n": len(every)}
    return table


def markdown_table(rows: list[dict]) -> str:
    """Scores per configuration (rows) and task (columns), with the average and the bytes really held."""
    table = summary(rows)
    tasks = sorted({task for scores in table.values() for task in scores} - {"average", "bytes", "n"})
    lines = ["| method | ratio | quant | " + " | ".join(tasks) + " | average | bytes held |",
             "|---|---|---|" + "---|" * (len(tasks) + 2)]
    for key in _in_order(table):
        scores = table[key]
        cells = [f"{scores[t]:.1f}" if t in scores else "—" for t in tasks]
        lines.append(_configuration_cells(key) + " | ".join(cells)
                     + f" | {scores['average']:.1f} | {scores['bytes']:.0%} |")
    return "\n".join(lines)


def bucket_table(rows: list[dict], key: str = "length_bucket") -> str | None:
    """Per configuration, the average over tasks within each value of the samples' metadata `key` (LongBench-E's
    length buckets, as its official `eval.py --e` reports them); None when no row has one."""
    buckets = sorted({row["metadata"][key] for row in rows if key in row.get("metadata", {})})
    if not buckets:
        return None
    tables = {b: summary([row for row in rows if row.get("metadata", {}).get(key) == b]) for b in buckets}
    lines = ["| method | ratio | quant | " + " | ".join(buckets) + " |", "|---|---|---|" + "---|" * len(buckets)]
    for configuration in _in_order({c for table in tables.values() for c in table}):
        cells = [f"{tables[b][configuration]['average']:.1f}" if configuration in tables[b] else "—" for b in buckets]
        lines.append(_configuration_cells(configuration) + " | ".join(cells) + " |")
    return "\n".join(lines)


def _in_order(configurations) -> list[tuple]:
    return sorted(configurations, key=lambda c: (c[0], c[1] or 0, c[2] or ""))


def _configuration_cells(configuration: tuple) -> str:
    method, ratio, quant = configuration
    return f"| {method} | {'—' if ratio is None else ratio} | {quant or '—'} | "
