"""The report's plots, drawn with matplotlib's Agg canvas (no pyplot, no global backend change) and
returned as ``data:`` URIs."""

from __future__ import annotations

import numpy as np

from pipeline.html.markup import png

KEPT_COLOUR = "#3a9d5d"
# rejected statuses in the funnel plot (matplotlib's tab10 without its green, which means "kept")
STATUS_COLOURS = ("#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
GROUP_COLOURS = ("#3a7bd5", "#e0662b", "#3a9d5d", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c")
LINE_STYLES = ("--", ":", "-.")


def figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.add_subplot()


def funnel(rows: list[dict]) -> str:
    """Stacked bars per stage: rows still ok after it, and the rows it rejected per status."""
    statuses = sorted({k for r in rows for k in r["rejected"]})
    fig, ax = figure(8, 0.45 * len(rows) + 1.2)
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["out"] for r in rows], color=KEPT_COLOUR, label="ok after stage")
    left = np.array([r["out"] for r in rows], dtype=float)
    for i, st in enumerate(statuses):
        w = np.array([r["rejected"].get(st, 0) for r in rows], dtype=float)
        ax.barh(y, w, left=left, color=STATUS_COLOURS[i % len(STATUS_COLOURS)], label=st)
        left += w
    ax.set_yticks(y, [r["stage"] for r in rows])
    ax.set_xlabel("rows")
    ax.set_title("rows per stage: kept, and rejected by status")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return png(fig)


def histogram(column: str, groups: list[tuple[str, np.ndarray]], thresholds: list[tuple[str, float]]) -> str:
    """Overlaid histograms of one score column per group, with a vertical line per threshold."""
    allv = np.concatenate([v for _, v in groups if len(v)])
    bins = np.linspace(float(allv.min()), float(allv.max()) + 1e-6, 41)
    fig, ax = figure(8, 3.6)
    for i, (label, values) in enumerate(groups):
        if len(values):
            colour = GROUP_COLOURS[i % len(GROUP_COLOURS)]
            ax.hist(values, bins=bins, alpha=0.6, color=colour, label=f"{label} ({len(values)})")
    for i, (label, v) in enumerate(thresholds):
        style = LINE_STYLES[i % len(LINE_STYLES)]
        ax.axvline(v, color="black", linestyle=style, linewidth=1.4, label=f"{label} = {v:.4g}")
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    ax.set_title(f"{column} histogram")
    ax.legend(fontsize=8, frameon=False)
    return png(fig)


def rank_plot(before: np.ndarray, after: np.ndarray, t: int | None) -> str:
    """Log-log rank plot of entry counts before (fitted pool) and after (kept rows), with ``t``."""
    fig, ax = figure(8, 4)
    for counts, label, colour in (
        (before, "before (fitted pool counts)", GROUP_COLOURS[0]),
        (after, "after (kept rows)", GROUP_COLOURS[1]),
    ):
        c = np.sort(counts[counts > 0])[::-1]
        if len(c):
            ax.loglog(
                np.arange(1, len(c) + 1), c, marker=".", color=colour, label=f"{label}: {len(c)} entries"
            )
    if t is not None:
        ax.axhline(t, color="black", linestyle="--", linewidth=1.2, label=f"t = {t}")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("matches")
    ax.set_title("entry counts (log-log rank plot)")
    ax.legend(fontsize=8, frameon=False)
    return png(fig)


def _bins(values: list[np.ndarray], log: bool, n: int = 30) -> np.ndarray:
    allv = np.concatenate([v for v in values if len(v)])
    lo, hi = float(allv.min()), float(allv.max())
    if log and lo > 0:
        return np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 1.01, n + 1)
    return np.linspace(lo, hi + 1e-6 if hi > lo else lo + 1, n + 1)


def distributions(panels: list[tuple[str, np.ndarray, np.ndarray, bool]]) -> str:
    """One histogram per statistic (name, all rows' values, kept rows' values, log x), side by side
    in rows of two: all rows in grey, kept rows in green."""
    cols = 2
    nrows = (len(panels) + cols - 1) // cols
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 2.8 * nrows))
    for i, (name, all_v, kept_v, log) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        bins = _bins([all_v, kept_v], log)
        ax.hist(all_v, bins=bins, color="#9aa3b5", label=f"all rows ({len(all_v)})")
        if len(kept_v):
            ax.hist(kept_v, bins=bins, color=KEPT_COLOUR, alpha=0.8, label=f"kept ({len(kept_v)})")
        if log and bins[0] > 0:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("rows")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return png(fig)


def categories(labels: list[str], all_n: list[int], kept_n: list[int]) -> str:
    """Grouped horizontal bars per category: all rows and kept rows."""
    fig, ax = figure(8, 0.32 * len(labels) + 1.2)
    y = np.arange(len(labels))[::-1]
    ax.barh(y + 0.2, all_n, height=0.4, color="#9aa3b5", label="all rows")
    ax.barh(y - 0.2, kept_n, height=0.4, color=KEPT_COLOUR, label="kept")
    ax.set_yticks(y, labels)
    ax.set_xlabel("rows")
    ax.legend(fontsize=8, frameon=False)
    return png(fig)


def stage_time(stages: list[str], busy: list[float], fit: list[float]) -> str:
    """Horizontal bars per stage: busy seconds summed over workers, and a global stage's fit pass."""
    fig, ax = figure(8, 0.45 * len(stages) + 1.2)
    y = np.arange(len(stages))[::-1]
    ax.barh(y, busy, color=GROUP_COLOURS[0], label="busy (summed over workers)")
    if any(fit):
        ax.barh(y, fit, left=busy, color=GROUP_COLOURS[1], label="fit pass (global stages)")
    for yi, b, f in zip(y, busy, fit):
        ax.text(b + f, yi, f" {b + f:.1f}s", va="center", fontsize=8)
    ax.set_xlim(0, max(b + f for b, f in zip(busy, fit)) * 1.12 or 1)
    ax.set_yticks(y, stages)
    ax.set_xlabel("seconds")
    ax.set_title("time per stage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return png(fig)
