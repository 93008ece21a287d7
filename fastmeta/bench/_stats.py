"""Summaries of per-task results: median, divergences, and a mean over the bounded tasks.

A fine-tuned task *diverged* when its value is NaN or infinite or, for a loss, when it
exceeds ``bound ×`` that task's loss before fine-tuning (:data:`DIVERGENCE_BOUND`). A
finite blow-up (``1e31``) would otherwise dominate every mean it enters; counting it as
diverged keeps the mean about the tasks that fine-tuning did not wreck, and the count
says how many it did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# A task whose loss after fine-tuning is more than this many times its loss before
# fine-tuning counts as diverged (as does a non-finite loss).
DIVERGENCE_BOUND = 100.0


def summarize(
    values: Tensor | Sequence[float],
    *,
    before: Tensor | Sequence[float] | None = None,
    bound: float = DIVERGENCE_BOUND,
) -> dict[str, Any]:
    """Median, diverged count, and mean ± 95% CI (``1.96·std/√n``) over the bounded tasks.

    A task diverged when its value is NaN or infinite or, given ``before`` (each task's
    loss before fine-tuning), when it is larger than ``bound * before``. Diverged tasks
    are counted in ``diverged`` and left out of ``mean`` and ``ci95``; ``median`` is over
    all tasks, a diverged task counting as larger than every other (``inf`` when half or
    more diverged), so it stays meaningful when a few tasks blow up.

    Args:
        values: one value per task (a loss or a score).
        before: one loss per task before fine-tuning; ``None`` (scores such as accuracy)
            counts only non-finite values as diverged.
        bound: the factor over ``before`` beyond which a task diverged.

    Returns:
        ``{"mean", "ci95", "median", "diverged", "tasks", "bound"}``; ``mean``/``ci95`` are
        ``None`` when every task diverged; ``bound`` is ``None`` without ``before``.
    """
    data = torch.as_tensor(values, dtype=torch.float64).flatten()
    bounded = torch.isfinite(data)
    if before is not None:
        start = torch.as_tensor(before, dtype=torch.float64).flatten()
        if start.shape != data.shape:
            raise ValueError(
                f"before must hold one loss per task ({len(data)}), got shape "
                f"{tuple(start.shape)}; pass the per-task losses before fine-tuning")
        bounded &= data <= bound * start
    kept = data[bounded]
    ordered = torch.where(bounded, data, torch.full_like(data, math.inf)).sort().values
    n = len(ordered)
    median = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2) if n else math.nan
    mean = float(kept.mean()) if len(kept) else None
    ci95 = float(1.96 * kept.std(unbiased=True) / math.sqrt(len(kept))) if len(kept) > 1 else None
    return {
        "mean": mean,
        "ci95": ci95 if ci95 is not None else (0.0 if mean is not None else None),
        "median": median,
        "diverged": int((~bounded).sum()),
        "tasks": int(len(data)),
        "bound": None if before is None else float(bound),
    }


def _value(value: float, digits: int) -> str:
    return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.{digits}f}"


def format_cell(summary: dict[str, Any], *, digits: int = 3) -> str:
    """``"0.351 ± 0.021"`` (and ``" (2 diverged)"``), or ``"diverged"`` if all did."""
    if summary["mean"] is None:
        return f"diverged ({summary['diverged']}/{summary['tasks']})"
    text = f"{_value(summary['mean'], digits)} ± {_value(summary['ci95'], digits)}"
    if summary["diverged"]:
        text += f" ({summary['diverged']} diverged)"
    return text


def format_median(median: float | str, *, digits: int = 3) -> str:
    """A median as the tables show it: ``"diverged"`` when it is not finite (``"inf"`` and
    ``"nan"`` are how ``results.json`` stores non-finite numbers)."""
    finite = isinstance(median, (int, float)) and math.isfinite(median)
    return _value(float(median), digits) if finite else "diverged"


def format_median_cell(summary: dict[str, Any], *, digits: int = 3) -> str:
    """Median first, then the mean ± 95% CI over the bounded tasks, then any divergences.

    ``"0.351 (0.372 ± 0.021)"``; ``"0.351 (0.372 ± 0.021), 3/200 diverged"``; a median
    that falls on a diverged task reads ``"diverged"``.
    """
    text = format_median(summary["median"], digits=digits)
    if summary["mean"] is not None:
        text += f" ({_value(summary['mean'], digits)} ± {_value(summary['ci95'], digits)})"
    if summary["diverged"]:
        text += f", {summary['diverged']}/{summary['tasks']} diverged"
    return text
