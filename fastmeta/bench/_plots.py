"""Figures of the benchmarks (matplotlib, drawn off-screen to PNG files)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

MISSING_MATPLOTLIB = (
    "the benchmark figures need matplotlib: pip install 'fastmeta[plot]' "
    "(or pass --no-plots to write only results.json and results.md)"
)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the off-screen Agg backend, or a clear ImportError."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(MISSING_MATPLOTLIB) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int) -> tuple[int, int]:
    columns = min(count, 4)
    return math.ceil(count / columns), columns


def _finish(plt: Any, figure: Any, axes: Any, used: int, title: str, path: Path) -> Path:
    """Hide unused panels, add the legend and title, write the PNG and free the figure."""
    for axis in list(axes.flat)[used:]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def curves(
    panels: dict[str, dict[str, dict[str, Any]]],
    path: Path,
    *,
    ylabel: str,
    title: str,
    log: bool = False,
    median: bool = False,
) -> Path:
    """Metric against fine-tuning steps, one line per algorithm, one panel per setting.

    Args:
        panels: ``{panel title: {algorithm: fine_tuning_curve(...) result}}``.
        path: PNG file to write.
        ylabel: label of the metric axis.
        title: figure title.
        log: logarithmic metric axis.
        median: plot the median over tasks instead of the mean ± 95% CI, with the axis
            capped at 3x the largest value before fine-tuning: a few tasks whose
            fine-tuning blows up would otherwise stretch the axis to 1e30 and flatten
            every other curve.
    """
    plt = pyplot()
    rows, columns = _grid(len(panels))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False, sharey=not median
    )
    for axis, (panel, by_algorithm) in zip(axes.flat, panels.items(), strict=False):
        if log:
            axis.set_yscale("log")
        for algorithm, curve in by_algorithm.items():
            if median:
                medians = [float(s["median"]) for s in curve["summaries"]]
                axis.plot(curve["steps"], medians, marker=".", label=algorithm)
                continue
            means = [s["mean"] if s["mean"] is not None else math.nan for s in curve["summaries"]]
            errors = [s["ci95"] if s["ci95"] is not None else 0.0 for s in curve["summaries"]]
            axis.errorbar(curve["steps"], means, yerr=errors, label=algorithm, capsize=2)
        if median:
            start = max(float(c["summaries"][0]["median"]) for c in by_algorithm.values())
            lowest = min(float(s["median"]) for c in by_algorithm.values()
                         for s in c["summaries"])
            if math.isfinite(start) and start > 0 and lowest > 0:
                axis.set_ylim(0.8 * lowest, 3 * start)
        axis.set_title(panel)
        axis.set_xlabel("fine-tuning steps")
        axis.grid(alpha=0.3)
    for axis in axes[:, 0]:
        axis.set_ylabel(ylabel)
    return _finish(plt, figure, axes, len(panels), title, path)


def fits(
    panels: dict[str, dict[str, Any]],
    path: Path,
    *,
    title: str,
) -> Path:
    """Predictions against the true function and the support points, one panel each.

    Args:
        panels: ``{panel title: {"x": [...], "truth": [...], "support_x": [...],
            "support_y": [...], "predictions": {label: [...]}}}``.
        path: PNG file to write.
        title: figure title.
    """
    plt = pyplot()
    rows, columns = _grid(len(panels))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False
    )
    for axis, (panel, data) in zip(axes.flat, panels.items(), strict=False):
        axis.plot(data["x"], data["truth"], color="black", linewidth=2, label="truth")
        styles = itertools.cycle((":", "--", "-", "-."))
        for (label, prediction), style in zip(data["predictions"].items(), styles, strict=False):
            axis.plot(data["x"], prediction, style, label=label)
        axis.scatter(
            data["support_x"], data["support_y"], color="red", zorder=3, label="support points"
        )
        low, high = min(data["truth"]), max(data["truth"])
        pad = 0.5 * (high - low) + 0.5  # a diverged prediction must not squash the truth
        axis.set_ylim(low - pad, high + pad)
        axis.set_title(panel)
        axis.grid(alpha=0.3)
    return _finish(plt, figure, axes, len(panels), title, path)
