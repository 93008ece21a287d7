"""The benchmarks behind ``fastmeta bench``: one protocol, one runner, one registry.

Example:
    >>> from fastmeta.bench import benchmark, run_benchmark
    >>> sine = benchmark("sine")
    >>> results = run_benchmark(sine, sine.config(iterations=2000, eval_tasks=200), Path("out"))
"""

from __future__ import annotations

from ._checkpoint import (
    CheckpointError,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    save_checkpoint,
)
from ._config import BenchConfig, setting
from ._evaluate_checkpoint import evaluate_checkpoint
from ._loggers import LOG_FORMATS, RunLog, write_logs
from ._outdir import OutDirError, RunLock, RunLocked
from ._progress import Progress
from ._protocol import Benchmark, Outcome, RunPlan, benchmark, names
from ._runner import run_benchmark
from ._signals import Interrupted, StopFlag, stop_on_signals
from ._stats import summarize
from ._train import TrainingDiverged

__all__ = [
    "LOG_FORMATS",
    "BenchConfig",
    "Benchmark",
    "CheckpointError",
    "Interrupted",
    "OutDirError",
    "Outcome",
    "Progress",
    "RunLock",
    "RunLocked",
    "RunLog",
    "RunPlan",
    "StopFlag",
    "TrainingDiverged",
    "UnverifiedCheckpointWarning",
    "benchmark",
    "evaluate_checkpoint",
    "load_checkpoint",
    "names",
    "run_benchmark",
    "save_checkpoint",
    "setting",
    "stop_on_signals",
    "summarize",
    "write_logs",
]
