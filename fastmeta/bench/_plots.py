"""Figures of the benchmarks (matplotlib, drawn off-screen to PNG files).

Every figure follows the same rules, so that a reader can compare its panels at a glance:
panels that are compared share their axis limits; every panel has both axis labels; step
axes have integer ticks; the legend stands beside the panels, never over the data; and a
curve that leaves the plotted range, or becomes non-finite (diverged), is marked where it
leaves, with a note under the figure saying what the marks mean.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MISSING_MATPLOTLIB = (
    "the benchmark figures need matplotlib: pip install 'fastmeta[plot]' "
    "(or pass --no-plots to write only results.json and results.md)"
)

OFF_SCALE_NOTE = (
    "▲ / ▼: the curve leaves the plotted range there (later values are off the scale; "
    "the numbers are in results.md)"
)
DIVERGED_NOTE = ("✕: fine-tuning diverged from there on (the value is non-finite, or for a "
                 "median: half or more of the tasks diverged)")


# One colour per algorithm in every figure (matplotlib's default cycle, in this order).
_ALGORITHM_COLOURS = (
    "maml", "fomaml", "reptile", "metasgd", "anil", "transfer", "random", "finetune",
    "mamlpp", "imaml",
)


def _colour(plt: Any, name: str, index: int) -> Any:
    """The colour of ``name`` if it is a known algorithm, else the ``index``-th colour."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    position = _ALGORITHM_COLOURS.index(name) if name in _ALGORITHM_COLOURS else index
    return cycle[position % len(cycle)]


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


def _finish(
    plt: Any, figure: Any, axes: Any, used: int, title: str, path: Path, notes: Sequence[str]
) -> Path:
    """Hide unused panels; add one legend beside the panels, the title and the notes
    explaining any marks; write the PNG and free the figure."""
    for axis in list(axes.flat)[used:]:
        axis.set_visible(False)
    labels: dict[str, Any] = {}
    for axis in list(axes.flat)[:used]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    if labels:
        figure.legend(
            list(labels.values()), list(labels), loc="outside right upper", fontsize="small"
        )
    figure.suptitle(title)
    if notes:
        figure.supxlabel("\n".join(dict.fromkeys(notes)), fontsize="small", color="0.3")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _integer_steps(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _clip(
    axis: Any,
    x: Sequence[float],
    y: Sequence[float],
    limits: tuple[float, float] | None,
    color: Any,
) -> tuple[list[float], list[str]]:
    """Values beyond ``limits`` become NaN (not drawn); mark where the curve leaves.

    Returns the drawable values and the notes for the marks made. Where the curve first
    goes above the top (below the bottom) of ``limits``, a ▲ (▼) stands on that edge of
    the panel; where its values first stop being finite, a ✕ stands on the top edge. The
    line runs on to the first point outside (clipped at the edge) and stops there.
    ``limits=None``: only
    non-finite values are marked.
    """
    edge = axis.get_xaxis_transform()  # x in data units, y in panel fractions
    drawable: list[float] = []
    notes: list[str] = []
    outside = False
    for position, value in zip(x, y, strict=True):
        mark: tuple[float, str, str] | None = None
        if not math.isfinite(value):
            mark = (1.0, "X", DIVERGED_NOTE)
        elif limits is not None and value > limits[1]:
            mark = (1.0, "^", OFF_SCALE_NOTE)
        elif limits is not None and value < limits[0]:
            mark = (0.0, "v", OFF_SCALE_NOTE)
        if mark is None:
            outside = False
            drawable.append(value)
            continue
        if not outside:
            height, marker, note = mark
            axis.plot([position], [height], marker=marker, color=color, markersize=9,
                      transform=edge, clip_on=False, zorder=4, linestyle="none")
            notes.append(note)
            # A finite first point outside keeps the line heading off the panel's edge.
            drawable.append(value if math.isfinite(value) else math.nan)
        else:
            drawable.append(math.nan)
        outside = True
    return drawable, notes


def _log_limits(values: Sequence[float], starts: Sequence[float]) -> tuple[float, float] | None:
    """Axis limits for median curves on a log scale: from just below the lowest value to
    3x the highest value before fine-tuning, so that a few tasks blowing up do not stretch
    the axis to 1e30 and flatten every other curve."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    first = [v for v in starts if math.isfinite(v) and v > 0]
    if not finite or not first:
        return None
    return 0.8 * min(finite), 3 * max(first)


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

    All panels share both axes. Curves that leave the shared range, or become
    non-finite, are cut there and marked (see the module docstring).

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
        rows, columns, figsize=(4.2 * columns + 1.6, 3.6 * rows + 0.6), squeeze=False,
        sharex=True, sharey=True, layout="constrained",
    )

    def values(curve: dict[str, Any], key: str) -> list[float]:
        return [math.nan if s[key] is None else float(s[key]) for s in curve["summaries"]]

    key = "median" if median else "mean"
    every = [v for by in panels.values() for c in by.values() for v in values(c, key)]
    limits: tuple[float, float] | None = None
    if median:
        starts = [values(c, key)[0] for by in panels.values() for c in by.values()]
        limits = _log_limits(every, starts) if log else None
    notes: list[str] = []
    for axis, (panel, by_algorithm) in zip(axes.flat, panels.items(), strict=False):
        if log:
            axis.set_yscale("log")
        if limits is not None:
            axis.set_ylim(*limits)
        for index, (algorithm, curve) in enumerate(by_algorithm.items()):
            color = _colour(plt, algorithm, index)
            steps = [float(s) for s in curve["steps"]]
            drawable, marked = _clip(axis, steps, values(curve, key), limits, color)
            notes += marked
            if median:
                axis.plot(steps, drawable, marker=".", label=algorithm, color=color)
            else:
                errors = [0.0 if s["ci95"] is None else float(s["ci95"])
                          for s in curve["summaries"]]
                axis.errorbar(steps, drawable, yerr=errors, label=algorithm, capsize=2,
                              color=color)
        axis.set_title(panel)
        axis.set_xlabel("fine-tuning steps")
        axis.set_ylabel(ylabel)
        axis.tick_params(labelleft=True, labelbottom=True)
        _integer_steps(axis)
        axis.grid(alpha=0.3)
    return _finish(plt, figure, axes, len(panels), title, path, notes)


def fits(
    panels: dict[str, dict[str, Any]],
    path: Path,
    *,
    title: str,
) -> Path:
    """Predictions against the true function and the support points, one panel each.

    All panels share both axes, set by the true functions (with a margin), so a
    prediction that diverged cannot squash the truth: where it leaves the range it is
    cut and marked, and a prediction that is non-finite is named in its panel.

    Args:
        panels: ``{panel title: {"x": [...], "truth": [...], "support_x": [...],
            "support_y": [...], "predictions": {label: [...]}}}``.
        path: PNG file to write.
        title: figure title.
    """
    plt = pyplot()
    rows, columns = _grid(len(panels))
    figure, axes = plt.subplots(
        rows, columns, figsize=(4.2 * columns + 1.6, 3.4 * rows + 0.6), squeeze=False,
        sharex=True, sharey=True, layout="constrained",
    )
    truths = [float(v) for data in panels.values() for v in data["truth"]]
    low, high = min(truths), max(truths)
    pad = 0.5 * (high - low) + 0.5
    limits = (low - pad, high + pad)
    notes: list[str] = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (panel, data) in zip(axes.flat, panels.items(), strict=False):
        axis.set_ylim(*limits)
        axis.plot(data["x"], data["truth"], color="black", linewidth=2, label="truth")
        styles = itertools.cycle((":", "--", "-", "-."))
        diverged: list[str] = []
        for index, ((label, prediction), style) in enumerate(
            zip(data["predictions"].items(), styles, strict=False)
        ):
            color = colors[index % len(colors)]
            x = [float(v) for v in data["x"]]
            y = [float(v) for v in prediction]
            if not any(math.isfinite(v) for v in y):
                # Nothing to draw: keep the label in the legend and say why it is missing.
                axis.plot([], [], style, color=color, label=label)
                diverged.append(label)
                continue
            drawable, marked = _clip(axis, x, y, limits, color)
            notes += marked
            axis.plot(x, drawable, style, color=color, label=label)
        if diverged:
            axis.text(
                0.03, 0.97, "\n".join(f"{label}: diverged (non-finite)" for label in diverged),
                transform=axis.transAxes, va="top", fontsize="small", color="firebrick",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "firebrick"},
            )
            notes.append("a prediction that became non-finite (diverged) is named in its panel")
        axis.scatter(
            data["support_x"], data["support_y"], color="red", zorder=3, label="support points"
        )
        axis.set_title(panel)
        axis.set_xlabel("x")
        axis.set_ylabel("y")
        axis.tick_params(labelleft=True, labelbottom=True)
        axis.grid(alpha=0.3)
    return _finish(plt, figure, axes, len(panels), title, path, notes)
