"""Benchmarks (data and metrics), sweeps, result files and plots: what `kvsqueeze eval` runs."""

import inspect

from .base import REGISTRY, Benchmark, Question, Sample
from .runner import Configuration, bucket_table, configurations, markdown_table, read_results, summary, sweep


def available() -> dict[str, type[Benchmark]]:
    """Registry name -> benchmark class, sorted by name."""
    from . import benchmarks  # noqa: F401  registers them

    return dict(sorted(REGISTRY.items()))


def benchmark(name: str, params: dict | None = None, **settings) -> Benchmark:
    """A benchmark by name; `settings` it does not take are left out (e.g. `length` for hub datasets), `params`
    (what a user named: `-p key=value`) must all be its own."""
    registry = available()
    if name not in registry:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(registry)}")
    accepted = inspect.signature(registry[name]).parameters
    unknown = sorted(set(params or {}) - set(accepted))
    if unknown:
        raise ValueError(f"{name} has no setting {', '.join(unknown)}; its settings: {', '.join(accepted)}")
    return registry[name](**{k: v for k, v in settings.items() if k in accepted and v is not None}, **(params or {}))
