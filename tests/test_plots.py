"""The benchmark figures follow their reading rules: axis labels on every panel, shared
limits, integer step ticks, the legend beside the panels, and curves that diverge or leave
the plotted range marked rather than lost."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.ticker import MaxNLocator  # noqa: E402

from fastmeta.bench import _plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The figures the plotting functions draw, kept open for inspection."""
    plt = _plots.pyplot()
    kept: list[Any] = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for figure in kept:
        plt.close(figure)


def _curve(values: list[float]) -> dict[str, Any]:
    return {"steps": list(range(len(values))),
            "summaries": [{"mean": v, "ci95": 0.1, "median": v} for v in values]}


def _markers(axis: Any) -> set[str]:
    return {line.get_marker() for line in axis.get_lines() if line.get_linestyle() == "None"}


def test_curves_mark_diverged_and_off_scale_curves(figures: list[Any], tmp_path: Path) -> None:
    panels = {
        "K = 5": {"maml": _curve([2.0, 0.5, 0.3]), "metasgd": _curve([2.0, 0.2, 1e9])},
        "K = 10": {"maml": _curve([2.0, 0.2, 0.1]), "metasgd": _curve([2.0, math.inf, math.nan])},
    }
    path = _plots.curves(panels, tmp_path / "c.png", ylabel="query MSE", title="t",
                         log=True, median=True)
    assert path.read_bytes()[:4] == b"\x89PNG"
    (figure,) = figures
    axes = [axis for axis in figure.axes if axis.get_visible()]
    assert len(axes) == 2
    assert all(axis.get_ylabel() == "query MSE" for axis in axes)
    assert all(axis.get_xlabel() == "fine-tuning steps" for axis in axes)
    assert axes[0].get_ylim() == axes[1].get_ylim()
    assert all(isinstance(axis.xaxis.get_major_locator(), MaxNLocator) for axis in axes)
    assert all(axis.get_legend() is None for axis in axes) and figure.legends
    assert "^" in _markers(axes[0])  # 1e9 is far above 3x the starting value
    assert "X" in _markers(axes[1])  # inf and nan: diverged
    note = figure._supxlabel.get_text()
    assert "leaves the plotted range" in note and "non-finite" in note


def test_fits_name_a_diverged_prediction(figures: list[Any], tmp_path: Path) -> None:
    x = [i / 10 for i in range(-50, 51)]
    truth = [math.sin(v) for v in x]
    panel = {"x": x, "truth": truth, "support_x": [0.0], "support_y": [0.0]}
    panels = {
        "maml": {**panel, "predictions": {"after 0 steps": [0.0] * len(x),
                                          "after 10 steps": truth}},
        "metasgd": {**panel, "predictions": {"after 0 steps": [50.0] * len(x),
                                             "after 10 steps": [math.nan] * len(x)}},
    }
    _plots.fits(panels, tmp_path / "f.png", title="t")
    (figure,) = figures
    maml, metasgd = (axis for axis in figure.axes if axis.get_visible())
    assert maml.get_ylim() == metasgd.get_ylim()
    assert all(axis.get_xlabel() == "x" and axis.get_ylabel() == "y" for axis in (maml, metasgd))
    texts = " ".join(text.get_text() for text in metasgd.texts)
    assert "after 10 steps: diverged (non-finite)" in texts
    assert "^" in _markers(metasgd)  # the constant 50 is off the scale
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "after 10 steps" in labels  # still in the legend, though nothing is drawn
