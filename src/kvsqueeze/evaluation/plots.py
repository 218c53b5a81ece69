"""Plots of sweep results: score against compression ratio, and needle heatmaps (length x depth)."""

from __future__ import annotations

from pathlib import Path

from .runner import summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(rows: list[dict], path: str | Path) -> Path:
    """Score (average over tasks) against compression ratio, one line per method and quantizer; the full cache
    as a horizontal line. Written as a PNG."""
    plt = _pyplot()
    table = summary(rows)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple, list] = {}
    for (method, ratio, quant), scores in table.items():
        lines.setdefault((method, quant), []).append((ratio, scores["average"]))
    for (method, quant), points in sorted(lines.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        label = method + (f" + {quant}" if quant else "")
        if all(r is None for r, _ in points):
            axis.axhline(points[0][1], linestyle="--", color="gray" if method == "full" else None, label=label)
            continue
        points = sorted((r, s) for r, s in points if r is not None)
        axis.plot(*zip(*points), marker="o", label=label)
    benchmark = rows[0]["benchmark"] if rows else ""
    axis.set_xlabel("compression ratio (fraction of the context's KV entries removed)")
    axis.set_ylabel("score (average over tasks)")
    axis.set_title(f"{benchmark}: score vs compression")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def needle_heatmaps(rows: list[dict], path: str | Path) -> Path:
    """One heatmap per configuration of the needle benchmark: share found by context length (rows) and depth
    (columns). Written as one PNG."""
    plt = _pyplot()
    rows = [r for r in rows if r["benchmark"] == "needle"]
    configurations = sorted({(r["method"], r["ratio"], r["quant"]) for r in rows},
                            key=lambda c: (c[0], c[1] or 0, c[2] or ""))
    lengths = sorted({int(r["task"]) for r in rows})
    depths = sorted({r["metadata"]["depth"] for r in rows})
    figure, axes = plt.subplots(1, len(configurations), figsize=(3.2 * len(configurations) + 1, 3.4), squeeze=False)
    for axis, (method, ratio, quant) in zip(axes[0], configurations):
        grid = [[float("nan")] * len(depths) for _ in lengths]
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                hits = [r["score"] for r in rows if (r["method"], r["ratio"], r["quant"]) == (method, ratio, quant)
                        and int(r["task"]) == length and r["metadata"]["depth"] == depth]
                if hits:
                    grid[i][j] = sum(hits) / len(hits)
        image = axis.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        axis.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        axis.set_yticks(range(len(lengths)), lengths, fontsize=7)
        axis.set_xlabel("needle depth")
        axis.set_title(method + ("" if ratio is None else f" {ratio}") + (f" + {quant}" if quant else ""), fontsize=9)
    axes[0][0].set_ylabel("context tokens")
    figure.colorbar(image, ax=list(axes[0]), label="found (%)")
    path = Path(path)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
