"""``fastmeta eval CHECKPOINT``: evaluate a saved learner on its benchmark's held-out tasks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from ._config import BenchConfig
from ._plots import curves
from ._registry import load_learner
from ._stats import format_cell


def _table(algorithm: str, label: str, by_setting: dict[str, dict[str, Any]]) -> str:
    lines = []
    for setting, curve in by_setting.items():
        lines += [f"{algorithm}, {setting}: {label} after each fine-tuning step"]
        for step, summary in zip(curve["steps"], curve["summaries"], strict=True):
            median = summary["median"]
            lines.append(
                f"  {step:>3} steps  {format_cell(summary, digits=4):<28} median {median:.4f}"
            )
    return "\n".join(lines)


C = TypeVar("C", bound=BenchConfig)


def _override(
    config_class: type[C], payload: dict[str, Any], algorithm: str, overrides: dict[str, Any]
) -> C:
    """The run's configuration from the checkpoint, with the given settings replaced."""
    values = {
        **payload["metadata"]["config"],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
           if v is not None},
        "algorithms": [algorithm],
    }
    return config_class.from_dict(values)


def evaluate_checkpoint(
    path: Path | str,
    *,
    shots: Sequence[int] | None = None,
    steps: int | None = None,
    tasks: int | None = None,
    plot_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune the learner saved at ``path`` on held-out tasks and summarise the results.

    Without overrides this evaluates exactly as the ``fastmeta bench`` run that wrote the
    checkpoint did (same tasks, same settings), so it reproduces that run's numbers.

    Args:
        path: a checkpoint from ``OUT/checkpoints/``.
        shots: support points (regression) or images per class (classification).
        steps: fine-tuning steps, evaluated after 0 through ``steps``.
        tasks: number of held-out tasks.
        plot_dir: also write figures there.

    Returns:
        ``{"results": {setting: fine_tuning_curve}, "text": printable table, "figures": [...]}``.
    """
    learner, payload = load_learner(path)
    spec = payload["spec"]
    benchmark = spec.get("benchmark")
    algorithm = spec["algorithm"]
    if benchmark == "sine":
        from . import sine

        sine_config = _override(sine.SineConfig, payload, algorithm, {
            "eval_shots": shots, "eval_steps": steps, "eval_tasks": tasks})
        evaluation = sine.evaluate_learner(learner, sine_config)
        results = {f"K={k}": evaluation["curves"][str(k)] for k in sine_config.eval_shots}
        label = "query MSE"
        ylabel = f"{label}, median over tasks"
        title = f"{algorithm}: fine-tuning on {sine_config.eval_tasks} held-out tasks"
        options = {"log": True, "median": True}

        def more_figures(directory: Path) -> list[Path]:
            return [sine.fit_figure({algorithm: learner}, sine_config, directory,
                                    name=f"eval_{algorithm}_fits.png")]
    elif benchmark == "digits":
        from . import digits

        digits_config = _override(digits.DigitsConfig, payload, algorithm, {
            "shots": shots, "eval_steps": steps, "eval_tasks": tasks})
        results = digits.evaluate_learner(learner, algorithm, digits_config)
        label = ylabel = "query accuracy"
        title = f"{algorithm}: fine-tuning on held-out classes"
        options = {}

        def more_figures(directory: Path) -> list[Path]:
            return []
    else:
        raise ValueError(f"{path}: unknown benchmark {benchmark!r} in the checkpoint's spec")
    figures: list[str] = []
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        panels = {key: {algorithm: value} for key, value in results.items()}
        path_out = plot_dir / f"eval_{algorithm}_curves.png"
        figures.append(str(curves(panels, path_out, ylabel=ylabel, title=title, **options)))
        figures += [str(figure) for figure in more_figures(plot_dir)]
    text = _table(algorithm, label, results)
    if figures:
        text += "\nwrote " + ", ".join(figures)
    return {"results": results, "text": text, "figures": figures}
