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
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import Benchmark, Sample


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


def answer(model, tokenizer, sample: Sample, configuration: Configuration, query_aware: bool, check_window: bool):
    """(predictions, stats of each compression) for every question of `sample`.

    Query-agnostic: the context is compressed once and every question asked on it. Query-aware: each
    question is appended to the context before compression, so the method sees it.
    """
    from ..pipeline import compress

    method = configuration.build()
    if not query_aware:
        ctx = compress(model, tokenizer, sample.context, method, quantizer=configuration.quant,
                       check_window=check_window)
        return [(ctx.ask(q.text, answer_prefix=q.answer_prefix, max_new_tokens=q.max_new_tokens), ctx.stats)
                for q in sample.questions]
    results = []
    for q in sample.questions:
        ctx = compress(model, tokenizer, sample.context + "\n\n" + q.text, method, quantizer=configuration.quant,
                       check_window=check_window)
        results.append((ctx.ask("", answer_prefix=q.answer_prefix, max_new_tokens=q.max_new_tokens), ctx.stats))
    return results


def sweep(model, tokenizer, benchmark: Benchmark, grid: list[Configuration], out: str | Path, *,
          samples: int | None = None, seed: int = 0, shard: tuple[int, int] = (0, 1), query_aware: bool = False,
          metadata: dict | None = None, check_window: bool = True, progress: bool = True) -> list[dict]:
    """Answer every question of the benchmark's samples under every configuration; append rows to `out`.

    Rows already in `out` are skipped. Returns the rows written by this call.
    """
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
    work = [(c, s) for c in grid for s in chosen
            if any((benchmark.name, s.task, s.id, i, c.method, c.ratio, c.quant) not in done
                   for i in range(len(s.questions)))]
    with out.open("a") as file:
        for configuration, sample in tqdm(work, desc=f"{benchmark.name}", disable=not progress):
            for i, (prediction, stats) in enumerate(answer(model, tokenizer, sample, configuration, query_aware,
                                                           check_window)):
                question = sample.questions[i]
                row = {"benchmark": benchmark.name, "task": sample.task, "sample": sample.id, "question": i,
                       "method": configuration.method, "ratio": configuration.ratio, "quant": configuration.quant,
                       "query_aware": query_aware, "prediction": prediction, "answers": question.answers,
                       "score": benchmark.score(prediction, question, sample.task),
                       "context_tokens": stats.context_tokens, "compression_ratio": stats.compression_ratio,
                       "bytes_held": stats.bytes_held, "bytes_uncompressed": stats.bytes_uncompressed,
                       "seconds": stats.seconds, "metadata": sample.metadata, "settings": benchmark.describe(),
                       "run": metadata}
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
    for (method, ratio, quant), scores in sorted(table.items(), key=lambda item: (item[0][0], item[0][1] or 0,
                                                                                   item[0][2] or "")):
        cells = [f"{scores[t]:.1f}" if t in scores else "—" for t in tasks]
        lines.append(f"| {method} | {'—' if ratio is None else ratio} | {quant or '—'} | " + " | ".join(cells)
                     + f" | {scores['average']:.1f} | {scores['bytes']:.0%} |")
    return "\n".join(lines)
