"""Print the table of every method on the needle test (docs/evaluation.md), from the registry and the needle results.

Name, paper (the arXiv ids or OpenReview page its docstring cites), phase, what it keeps (the first line
of its docstring), the calibration it needs, and the needle score on the bundled model at ratio 0.5
(from `benchmarks/needle_table.py`'s results; methods without a ratio: the run with the settings shown).

    python scripts/methods_table.py --settings scripts/methods_table_settings.json --extra results/needle_expensive.jsonl
"""

import argparse
import inspect
import json
import re
from pathlib import Path

import kvsqueeze


def papers(cls) -> str:
    """Links to the papers the docstring cites (arXiv ids, OpenReview pages), in the order it cites them."""
    doc = inspect.getdoc(cls) or ""
    found = [(m.start(), f"[{m.group(1)}](https://arxiv.org/abs/{m.group(1)})")
             for m in re.finditer(r"arXiv:\s?(\d{4}\.\d{4,5})", doc)]
    found += [(m.start(), f"[OpenReview](https://openreview.net/forum?id={m.group(1)})")
              for m in re.finditer(r"openreview\.net/forum\?id=(\w+)", doc)]
    return ", ".join(dict.fromkeys(link for _, link in sorted(found))) or "—"


def needle(rows: list[dict], spec: str, ratio) -> str:
    hits = [r for r in rows if r["method"] == spec and r["ratio"] == ratio]
    if not hits:
        return "—"
    share = sum(r["bytes_held"] / r["bytes_uncompressed"] for r in hits) / len(hits)
    return f"{sum(r['correct'] for r in hits)}/{len(hits)} ({share:.0%})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/needle_table.jsonl")
    parser.add_argument("--extra", action="append", default=[], help="more result files (e.g. fewer haystacks)")
    parser.add_argument("--settings", help="JSON {name: [spec, ratio]} for the methods run with other settings "
                                           "than their defaults at 0.5 (ratio null: methods without a ratio)")
    args = parser.parse_args()
    path = Path(args.results)
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    rows += [json.loads(line) for extra in args.extra for line in Path(extra).open()]
    rows = [r for r in rows if r.get("chunk") is None and r.get("quant") is None]
    settings = json.loads(Path(args.settings).read_text()) if args.settings else {}
    print("| name | paper | phase | keeps | calibration | needle at 0.5 (bytes held) |")
    print("|---|---|---|---|---|---|")
    print(f"| full cache | — | — | everything | — | {needle(rows, 'full', None)} |")
    for name, cls in sorted(kvsqueeze.available().items()):
        takes_ratio = "ratio" in inspect.signature(cls).parameters
        spec, ratio = settings.get(name, (name, 0.5 if takes_ratio else None))
        score = needle(rows, spec, ratio)
        if spec != name:
            score += f", `{spec}`"
        calibration = f"`kvsqueeze calibrate {cls.calibration}`" if cls.calibration else "—"
        if cls.calibration and not cls.calibration_required:
            calibration = "optional: " + calibration
        print(f"| `{name}` | {papers(cls)} | {cls.phase} | {cls.summary()} | {calibration} | {score} |")


if __name__ == "__main__":
    main()
