"""Needle score against the bytes the cache really holds: eviction alone, quantization alone, and both.

Reads the rows `needle_table.py` wrote (full prefill, no chunks) and draws one line per method and
quantizer through its ratios, x = bytes held after compression as a share of the full cache's bytes
(as the model stores it: float32 on CPU), y = needles found. Writes a PNG and prints the points.

    python benchmarks/score_vs_bytes.py --methods full,snapkv,streaming_llm --out results/score_vs_bytes.png
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(rows, methods):
    """{(method, quant): [(bytes share, found share, ratio, n)]}, sorted by bytes."""
    groups = defaultdict(list)
    for row in rows:
        if row.get("chunk") is None and row["method"] in methods:
            groups[(row["method"], row.get("quant"), row["ratio"])].append(row)
    lines = defaultdict(list)
    for (method, quant, ratio), hits in groups.items():
        share = sum(r["bytes_held"] / r["bytes_uncompressed"] for r in hits) / len(hits)
        lines[(method, quant)].append((share, sum(r["correct"] for r in hits) / len(hits), ratio, len(hits)))
    return {key: sorted(value) for key, value in lines.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/needle_table.jsonl")
    parser.add_argument("--methods", default="full,snapkv,streaming_llm")
    parser.add_argument("--out", default="results/score_vs_bytes.png")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.results).open()]
    lines = points(rows, args.methods.split(","))
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for (method, quant), line in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        label = method if quant is None else f"{method} + {quant}"
        xs, ys = [100 * p[0] for p in line], [100 * p[1] for p in line]
        axis.plot(xs, ys, marker="o" if quant is None else "s", linestyle="-" if quant is None else "--", label=label)
        for share, found, ratio, n in line:
            print(f"{label:28} ratio {ratio}: {share:6.1%} of the bytes, found {found:.0%} of {n}")
    axis.set_xscale("log")
    axis.set_xlabel("bytes held, % of the full cache (float32), log scale")
    axis.set_ylabel("needles found (%)")
    axis.set_title("Needle score vs bytes held (SmolLM2-135M, 3k tokens)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
