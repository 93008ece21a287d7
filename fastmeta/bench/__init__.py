"""The benchmarks behind ``fastmeta bench``: training, checkpoints, evaluation, figures.

Example:
    >>> from fastmeta.bench.sine import SineConfig, run_sine
    >>> results = run_sine(SineConfig(iterations=2000, eval_tasks=200), Path("out"))
"""

from __future__ import annotations

from ._checkpoint import load_checkpoint, save_checkpoint
from ._progress import Progress
from ._stats import summarize
from ._train import Interrupted, StopFlag, TrainingDiverged

__all__ = [
    "Interrupted",
    "Progress",
    "StopFlag",
    "TrainingDiverged",
    "load_checkpoint",
    "save_checkpoint",
    "summarize",
]
