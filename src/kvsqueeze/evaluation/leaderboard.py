"""The leaderboard: every method on one model over RULER and the needle grid, at several compression levels.

Every registered method that takes a ratio runs at each ratio; methods that take a budget or settings of their own
run at their defaults; every quantizer runs alone and on a few eviction methods, so eviction, quantization and
both compete on one axis, the bytes the cache really holds. Methods that need calibration on the model are
listed, not ranked, unless their calibration ships with it (HeadKV and DuoAttention on the bundled model).

It is two `eval` sweeps (resumable, shardable, one prefill per sample shared by every configuration that does
not change the prefill) into one folder; `write_page` turns their rows into a markdown page ranked by the mean
score over the ratios, and two figures: score against ratio, score against bytes held.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from .runner import Configuration, configurations, read_errors, read_results, run_metadata, summary, sweep

# methods that need a calibration made on the model (`calibration_required`) run where the bundled model ships it
BUNDLED_CALIBRATION = {"headkv": "head_scores", "duo_attention": "head_patterns"}
# not a compression of a prefilled context: a composition of other methods, and the decoding-time budgets
NOT_RANKED = {"composed": "composes other methods (each is ranked alone)",
              "per_layer_compression": "a ratio per layer, given by the user",
              "decoding_budget": "bounds the cache while generating, not the context",
              "rolling_streaming_llm": "bounds the cache while generating, not the context",
              "dms": "keeps what passes a score threshold, which depends on the model and the scorer (no ratio)"}


@dataclass
class Settings:
    """What a leaderboard run covers; the defaults are the published page's."""

    ratios: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    quantizers: list[str] = field(default_factory=lambda: ["kivi-4", "kivi-2"])
    combined: list[str] = field(default_factory=lambda: ["knorm", "snapkv", "streaming_llm"])  # eviction + quantizer
    ruler_length: int = 4096
    ruler_samples: int = 1  # per task
    ruler_tasks: list[str] | None = None  # None: all eleven
    needle_lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    needle_depths: int = 4
    methods: list[str] | None = None  # None: every method
    bundled: bool = True  # the model is the bundled SmolLM2 (its calibration files apply)


def calibrated_spec(name: str) -> str | None:
    """`name` with the bundled model's shipped calibration, or None when the bundled model ships none."""
    if name not in BUNDLED_CALIBRATION:
        return None
    path = files("kvsqueeze").joinpath(f"data/smollm2_{name}.json")
    return f"{name}:{BUNDLED_CALIBRATION[name]}={path}"


def contenders(settings: Settings) -> tuple[list[Configuration], dict[str, str]]:
    """The configurations the leaderboard runs, and the methods it leaves out with why."""
    from .. import methods

    registry = methods.available()
    specs, left_out = [], {}
    for name in settings.methods or list(registry):
        cls = registry[methods.registry_name(name)]
        spec = name
        if name in NOT_RANKED:
            left_out[name] = NOT_RANKED[name]
            continue
        if "attention_weights" in cls.declares:
            left_out[name] = "needs the attention weights, which only eager attention returns (the board runs sdpa)"
            continue
        if cls.calibration and cls.calibration_required:
            spec = calibrated_spec(name) if settings.bundled else None
            if spec is None:
                left_out[name] = f"needs calibration on the model (`kvsqueeze calibrate {cls.calibration}`)"
                continue
        specs.append(spec)
    grid = (configurations(["full"], [], [None, *settings.quantizers]) + configurations(specs, settings.ratios, [None])
            + configurations(settings.combined, settings.ratios, settings.quantizers))
    for configuration in grid:  # fail now on a bad method, not hours into the run
        configuration.build()
    return grid, left_out


def run(model, tokenizer, settings: Settings, out: str | Path, shard: tuple[int, int] = (0, 1),
        progress: bool = True) -> Path:
    """Run (or resume) both sweeps into the folder `out`; the wall time adds up in `out/run.json`."""
    from . import benchmark

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid, left_out = contenders(settings)
    record = out / "run.json"
    previous = json.loads(record.read_text()) if record.exists() else {}
    start = time.perf_counter()
    benches = {"ruler": benchmark("ruler", length=settings.ruler_length, tasks=settings.ruler_tasks),
               "needle": benchmark("needle", lengths=settings.needle_lengths)}
    samples = {"ruler": settings.ruler_samples, "needle": settings.needle_depths}
    metadata = run_metadata({"settings": settings.__dict__, "shard": list(shard)})
    for name, bench in benches.items():
        sweep(model, tokenizer, bench, grid, out / f"{name}.jsonl", samples=samples[name], shard=shard,
              metadata=metadata, progress=progress, errors="record")  # one configuration's error stops no other
        seconds = previous.get("seconds", 0.0) + time.perf_counter() - start  # after each sweep: a stopped run counts
        record.write_text(json.dumps({"seconds": seconds, "settings": settings.__dict__, "left_out": left_out,
                                      "configurations": len(grid), "device": metadata["device"],
                                      "threads": metadata["threads"], "commit": metadata["commit"]}, indent=1))
    return out


@dataclass
class Entry:
    """One row of the leaderboard: a method (with its quantizer) and its scores."""

    method: str
    quant: str | None
    scores: dict  # ratio (None: the method's own settings) -> {"ruler", "needle", "average", "bytes"}

    @property
    def label(self) -> str:
        name = self.method.partition(":")[0]
        return name + (f" + {self.quant}" if self.quant else "")

    @property
    def mean(self) -> float:
        return sum(s["average"] for s in self.scores.values()) / len(self.scores)

    @property
    def bytes(self) -> float:
        return sum(s["bytes"] for s in self.scores.values()) / len(self.scores)


def entries(folder: str | Path) -> list[Entry]:
    """The leaderboard's rows from a run's folder, best first (mean score, then fewer bytes)."""
    folder = Path(folder)
    per_benchmark = {name: summary(read_results(folder / f"{name}.jsonl")) for name in ("ruler", "needle")}
    keys = set(per_benchmark["ruler"]) & set(per_benchmark["needle"])
    grouped: dict[tuple, dict] = {}
    for method, ratio, quant in keys:
        ruler, needle = per_benchmark["ruler"][(method, ratio, quant)], per_benchmark["needle"][(method, ratio, quant)]
        grouped.setdefault((method, quant), {})[ratio] = {
            "ruler": ruler["average"], "needle": needle["average"],
            "average": (ruler["average"] + needle["average"]) / 2,
            "bytes": (ruler["bytes"] * ruler["n"] + needle["bytes"] * needle["n"]) / (ruler["n"] + needle["n"])}
    rows = [Entry(method, quant, scores) for (method, quant), scores in grouped.items()]
    return sorted(rows, key=lambda e: (-e.mean, e.bytes, e.label))


def failures(folder: str | Path) -> dict[str, str]:
    """{configuration's label: its error} for the configurations of a run that raised and have no result since."""
    folder = Path(folder)
    failed = {}
    for name in ("ruler", "needle"):
        for (method, ratio, quant), error in read_errors(folder / f"{name}.jsonl").items():
            label = Configuration(method, ratio, quant).label
            failed.setdefault(label, f"{name}: {error}")
    return failed


def table(rows: list[Entry], ratios: list[float]) -> str:
    """The ranked markdown table: the average of RULER and needle at each ratio, the mean, the bytes held."""
    head = ("| # | method | " + " | ".join(f"ratio {r}" for r in ratios) + " | own settings | mean | RULER | needle "
            "| bytes held |")
    lines = [head, "|---|---|" + "---|" * (len(ratios) + 5)]
    for rank, entry in enumerate(rows, 1):
        cells = [f"{entry.scores[r]['average']:.1f}" if r in entry.scores else "" for r in ratios]
        own = f"{entry.scores[None]['average']:.1f}" if None in entry.scores else ""
        ruler = sum(s["ruler"] for s in entry.scores.values()) / len(entry.scores)
        needle = sum(s["needle"] for s in entry.scores.values()) / len(entry.scores)
        lines.append(f"| {rank} | {entry.label} | " + " | ".join(cells)
                     + f" | {own} | **{entry.mean:.1f}** | {ruler:.1f} | {needle:.1f} | {entry.bytes:.0%} |")
    return "\n".join(lines)


def figures(rows: list[Entry], folder: Path, stem: str, top: int = 12) -> tuple[Path, Path]:
    """Score against ratio (the `top` best methods and the full cache) and score against bytes held (all)."""
    from .plots import _pyplot

    plt = _pyplot()
    by_ratio = folder / f"{stem}_ratio.png"
    figure, axis = plt.subplots(figsize=(8, 5))
    for entry in [e for e in rows if any(r is not None for r in e.scores)][:top]:
        points = sorted((r, s["average"]) for r, s in entry.scores.items() if r is not None)
        axis.plot(*zip(*points), marker="o", label=entry.label)
    full = next((e for e in rows if e.method == "full" and e.quant is None), None)
    if full is not None:
        axis.axhline(full.mean, color="gray", linestyle="--", label="full cache")
    axis.set_xlabel("compression ratio (fraction of the context's KV entries removed)")
    axis.set_ylabel("score (mean of RULER and needle)")
    axis.set_title(f"the {top} best methods: score against ratio")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(by_ratio, dpi=120)
    plt.close(figure)

    by_bytes = folder / f"{stem}_bytes.png"
    figure, axis = plt.subplots(figsize=(8, 5))
    kinds = {"eviction": ("o", "tab:blue"), "quantization": ("s", "tab:orange"), "both": ("^", "tab:green"),
             "full cache": ("*", "black")}
    for entry in rows:
        kind = ("full cache" if entry.method == "full" and not entry.quant else "quantization"
                if entry.method == "full" else "both" if entry.quant else "eviction")
        marker, color = kinds[kind]
        for s in entry.scores.values():
            axis.scatter(s["bytes"] * 100, s["average"], marker=marker, color=color, alpha=0.6, s=28,
                         zorder=3 if kind == "full cache" else 2)
    for kind, (marker, color) in kinds.items():
        axis.scatter([], [], marker=marker, color=color, label=kind)
    axis.set_xlabel("bytes held (% of the full cache)")
    axis.set_ylabel("score (mean of RULER and needle)")
    axis.set_title("every configuration: score against the bytes the cache holds")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(by_bytes, dpi=120)
    plt.close(figure)
    return by_ratio, by_bytes


def write_page(folder: str | Path, page: str | Path, readme: str | Path | None = None, top: int = 15) -> Path:
    """docs' leaderboard page (and its figures beside it) from a run's folder; with `readme`, the top `top` rows go
    between its `<!-- leaderboard -->` markers."""
    from .. import methods

    folder, page = Path(folder), Path(page)
    record = json.loads((folder / "run.json").read_text())
    settings = record["settings"]
    rows = entries(folder)
    if not rows:
        raise ValueError(f"{folder}: no configuration has results on both benchmarks yet")
    by_ratio, by_bytes = figures(rows, page.parent, page.stem)
    minutes = record["seconds"] / 60
    needle_lengths = ", ".join(map(str, settings["needle_lengths"]))
    tasks = ", ".join(settings["ruler_tasks"]) if settings.get("ruler_tasks") else "all 11 tasks"
    threads = f"{record['threads']} thread" + ("s" if record["threads"] != 1 else "")
    samples = f"{settings['ruler_samples']} sample" + ("s" if settings["ruler_samples"] != 1 else "")
    about = (f"The bundled model, {record['device']}, {threads}, commit "
             f"{str(record['commit'])[:10]}; {record['configurations']} configurations; RULER at "
             f"{settings['ruler_length']:,} tokens ({tasks}, {samples} each), needle at "
             f"{needle_lengths} tokens × {settings['needle_depths']} depths; {minutes:.0f} minutes in all.")
    why_not = dict(record["left_out"])
    ranked = {entry.method.partition(":")[0] for entry in rows}
    why_not |= {name: "not in this run (left out with `--methods`)" for name in methods.available()
                if name not in ranked and name not in why_not}
    left_out = "\n".join(f"- **{name}**: {why}" for name, why in sorted(why_not.items()))
    failed = failures(folder)
    errors = "" if not failed else ("\nFailed (they raised, so they have no score; a run resumed retries them):\n\n"
                                    + "\n".join(f"- **{label}**: `{error}`" for label, error in sorted(failed.items()))
                                    + "\n")
    text = f"""# Leaderboard

Every method on the bundled model, ranked by its mean score over RULER and the needle grid at every compression
ratio (the "own settings" column is for methods set by a budget or a threshold instead of a ratio, and for
quantizers alone). "bytes held" is what the cache really holds, measured, as a share of the full cache's bytes.
Made with one command, resumable (`--shard I/N` spreads it over machines):

```bash
kvsqueeze leaderboard            # writes results/leaderboard/ and this page
```

{about}

![score against ratio]({by_ratio.name})

![score against bytes held]({by_bytes.name})

{table(rows, settings['ratios'])}

Not ranked:

{left_out}
{errors}"""
    page.write_text(text)
    if readme is not None:
        write_section(readme, "leaderboard", table(rows[:top], settings["ratios"])
                      + f"\n\n{about} The whole table: [docs/leaderboard.md](docs/leaderboard.md).")
    return page


def write_section(path: str | Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- NAME -->` and `<!-- /NAME -->` in the file at `path` (generated sections)."""
    path = Path(path)
    source = path.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in source or end not in source:
        raise ValueError(f"{path} has no {start} ... {end} section to write")
    before, _, rest = source.partition(start)
    _, _, after = rest.partition(end)
    path.write_text(f"{before}{start}\n{text}\n{end}{after}")
