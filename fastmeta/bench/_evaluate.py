"""Few-shot evaluation: fine-tune on each task's support set, score on its query set."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._learner import AdaptedTasks, MetaLearner
from .._task import TaskBatch
from ._stats import format_median_cell, summarize

Metric = Callable[[Tensor, Tensor], Tensor]  # (prediction [T, n, ...], target) -> [T]


def mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error of each task: ``[tasks]``."""
    return ((prediction - target.to(prediction.dtype)) ** 2).flatten(1).mean(dim=1)


def accuracy(prediction: Tensor, target: Tensor) -> Tensor:
    """Fraction of correct class predictions of each task (``prediction`` are logits)."""
    return (prediction.argmax(dim=-1) == target).to(torch.float64).flatten(1).mean(dim=1)


def adapt_quietly(learner: MetaLearner, task: TaskBatch, steps: int) -> AdaptedTasks:
    """``learner.adapt_many`` without its warning on diverged tasks: callers count them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-finite support losses
        return learner.adapt_many(task, steps=steps)


def per_task(
    learner: MetaLearner, batch: TaskBatch | Any, steps: int, metric: Metric = mse
) -> Tensor:
    """``[tasks]`` metric on each task's query set after ``steps`` fine-tuning steps.

    A task whose fine-tuning diverges gets NaN, ``inf`` or a huge value (counted by
    :func:`summarize`) instead of a warning per call.
    """
    task = learner.prepare(batch)
    adapted = adapt_quietly(learner, task, steps)
    with torch.no_grad():
        prediction = adapted(task.query_x)
        return metric(prediction, task.query_y).to(torch.float64).cpu()


def fine_tuning_curve(
    learner: MetaLearner,
    batch: TaskBatch | Any,
    steps: int,
    metric: Metric = mse,
    *,
    bound: float | None = None,
) -> dict[str, Any]:
    """Summaries of the metric after ``0, 1, ..., steps`` fine-tuning steps.

    Args:
        bound: for a loss, a task whose loss exceeds ``bound ×`` its loss before
            fine-tuning (step 0) counts as diverged (see :func:`summarize`); ``None``
            counts only non-finite values.

    Returns:
        ``{"steps": [0..steps], "summaries": [summarize(...) per step]}``.
    """
    values = [per_task(learner, batch, s, metric) for s in range(steps + 1)]
    options: dict[str, Any] = {} if bound is None else {"before": values[0], "bound": bound}
    summaries = [summarize(v, **options) for v in values]
    return {"steps": list(range(steps + 1)), "summaries": summaries}


def bounded_after(
    learner: MetaLearner, batch: TaskBatch | Any, steps: int, bound: float, metric: Metric = mse
) -> dict[str, Any]:
    """:func:`summarize` of the loss after ``steps`` steps, bounded by ``bound ×`` the loss
    before fine-tuning."""
    return summarize(per_task(learner, batch, steps, metric),
                     before=per_task(learner, batch, 0, metric), bound=bound)


def curve_table(algorithm: str, label: str, by_setting: dict[str, dict[str, Any]]) -> str:
    """Printable table of fine-tuning curves: one block per setting, one line per step."""
    lines = []
    for setting, curve in by_setting.items():
        lines += [f"{algorithm}, {setting}: {label} after each fine-tuning step, median over "
                  f"the tasks (mean ± 95% CI over the tasks that did not diverge)"]
        for step, summary in zip(curve["steps"], curve["summaries"], strict=True):
            lines.append(f"  {step:>3} steps  {format_median_cell(summary, digits=4)}")
    return "\n".join(lines)
