"""Summaries of per-task results: mean with a 95% confidence interval, median, divergences."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def summarize(values: Tensor | Sequence[float]) -> dict[str, Any]:
    """Mean ± 95% CI (``1.96·std/√n``) and median of per-task values; never a silent ``inf``.

    Tasks whose value is NaN or infinite (fine-tuning diverged) are counted in
    ``diverged`` and left out of ``mean`` and ``ci95``; ``median`` is over all tasks (a
    diverged task counts as larger than every finite one), so it stays meaningful when a
    few tasks blow up.

    Returns:
        ``{"mean", "ci95", "median", "diverged", "tasks"}``; ``mean``/``ci95`` are ``None``
        when every task diverged.
    """
    data = torch.as_tensor(values, dtype=torch.float64).flatten()
    finite = torch.isfinite(data)
    kept = data[finite]
    ordered = torch.where(finite, data, torch.full_like(data, math.inf)).sort().values
    n = len(ordered)
    median = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2) if n else math.nan
    mean = float(kept.mean()) if len(kept) else None
    ci95 = float(1.96 * kept.std(unbiased=True) / math.sqrt(len(kept))) if len(kept) > 1 else None
    return {
        "mean": mean,
        "ci95": ci95 if ci95 is not None else (0.0 if mean is not None else None),
        "median": median,
        "diverged": int((~finite).sum()),
        "tasks": int(len(data)),
    }


def format_cell(summary: dict[str, Any], *, digits: int = 3) -> str:
    """``"0.351 ± 0.021"`` (and ``" (2 diverged)"``), or ``"diverged"`` if all did."""
    if summary["mean"] is None:
        return f"diverged ({summary['diverged']}/{summary['tasks']})"
    mean, ci95 = summary["mean"], summary["ci95"]
    if abs(mean) >= 1e4:  # fine-tuning blew up without reaching inf: keep the cell readable
        text = f"{mean:.3g} ± {ci95:.3g}"
    else:
        text = f"{mean:.{digits}f} ± {ci95:.{digits}f}"
    if summary["diverged"]:
        text += f" ({summary['diverged']} diverged)"
    return text
