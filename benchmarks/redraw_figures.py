"""Redraw the curve figures of saved benchmark runs from their ``results.json``.

Usage:
    python benchmarks/redraw_figures.py                  # docs/results/{sine,digits}
    python benchmarks/redraw_figures.py --sine runs/sine --digits runs/digits

The fine-tuning curves (``fine_tuning_curves.png``) and accuracy curves
(``accuracy_curves.png``) need only the numbers in ``results.json``, so they can be redrawn
after the plotting code changes without training again. The fits and robustness figures
need the meta-trained weights: ``fastmeta eval CHECKPOINT --plot`` draws them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fastmeta.bench import _plots


def redraw_sine(run: Path) -> Path:
    results: dict[str, Any] = json.loads((run / "results.json").read_text())
    config = results["config"]
    panels = {
        f"K = {shots}": {
            name: entry["evaluation"]["curves"][str(shots)]
            for name, entry in results["algorithms"].items()
        }
        for shots in config["eval_shots"]
    }
    return _plots.curves(
        panels,
        run / "fine_tuning_curves.png",
        ylabel="query MSE, median over tasks",
        title=f"Fine-tuning on {config['eval_tasks']} held-out sine tasks (means: results.md)",
        log=True,
        median=True,
    )


def redraw_digits(run: Path) -> Path:
    results: dict[str, Any] = json.loads((run / "results.json").read_text())
    config = results["config"]
    panels = {
        f"{config['ways']}-way {shots}-shot": {
            name: entry["evaluation"][f"{shots}-shot"]
            for name, entry in results["algorithms"].items()
        }
        for shots in config["shots"]
    }
    return _plots.curves(
        panels,
        run / "accuracy_curves.png",
        ylabel="query accuracy (mean ± 95% CI)",
        title=f"Fine-tuning on {config['eval_tasks']} held-out digit tasks",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sine", type=Path, default=Path("docs/results/sine"))
    parser.add_argument("--digits", type=Path, default=Path("docs/results/digits"))
    args = parser.parse_args()
    print("wrote", redraw_sine(args.sine), redraw_digits(args.digits))


if __name__ == "__main__":
    main()
