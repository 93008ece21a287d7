"""``fastmeta bench --log csv,tensorboard``: a run's curves for the tools users watch them in.

Written when a run finishes, beside ``results.json``, under ``OUT/logs/<format>/``:

- ``train/meta_loss``: the mean meta-loss of each logging window, at its meta-iteration;
- ``eval/...``: every number of the evaluation (fine-tuning curves as one series over
  the fine-tuning steps, other numbers at step 0);
- the engine each learner ran on and why (``learner.engine_decision``), and the
  configuration.

TensorBoard files are written by TensorBoard's own writer (``torch.utils.tensorboard``,
which needs the ``tensorboard`` package: ``pip install fastmeta[tensorboard]``); CSV by
Python's ``csv`` module, which needs nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._learner import MetaLearner

LOG_FORMATS = ("csv", "tensorboard")

# How strict JSON (results.json) spells the numbers it cannot write.
_NON_FINITE = ("nan", "inf", "-inf")

# (run, tag, step, value)
Scalar = tuple[str, str, int, float]


def check_log_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats, checked before any training: known names, their library installed.

    Raises:
        ValueError: an unknown format.
        ImportError: ``tensorboard`` is asked for but not installed (with the fix).
    """
    chosen = tuple(dict.fromkeys(formats))
    unknown = [name for name in chosen if name not in LOG_FORMATS]
    if unknown:
        raise ValueError(
            f"log must be among {list(LOG_FORMATS)} (comma-separated), got {unknown[0]!r}"
        )
    if "tensorboard" in chosen:
        _summary_writer()
    return chosen


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "--log tensorboard needs the tensorboard package, which is not installed: "
            "pip install 'fastmeta[tensorboard]' (or pip install tensorboard), or leave "
            "tensorboard out of --log"
        ) from None
    return SummaryWriter


@dataclasses.dataclass(frozen=True)
class RunLog:
    """What one trained learner contributes to the logs.

    Attributes:
        name: the run's name (``maml``, ``maml-seed1``, ...).
        loss_curve: ``[iteration, mean meta-loss]`` pairs of its training.
        learner: the trained learner (its engine decision is logged).
    """

    name: str
    loss_curve: list[list[float]]
    learner: MetaLearner


def scalars(runs: Sequence[RunLog], results: Mapping[str, Any]) -> list[Scalar]:
    """Every logged number: training curves per run, evaluation numbers per algorithm."""
    rows: list[Scalar] = []
    for run in runs:
        rows += [(run.name, "train/meta_loss", int(step), float(loss))
                 for step, loss in run.loss_curve]
    for algorithm, entry in results.get("algorithms", {}).items():
        evaluation = entry.get("evaluation") if isinstance(entry, Mapping) else None
        if evaluation is not None:
            rows += [(algorithm, f"eval/{tag}", step, value)
                     for tag, step, value in _numbers(evaluation)]
    return rows


def _numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, int, float]]:
    """``(tag, step, value)`` of every number; ``{"steps", "summaries"}`` as series."""
    if isinstance(tree, Mapping):
        steps, summaries = tree.get("steps"), tree.get("summaries")
        if isinstance(steps, list) and isinstance(summaries, list):
            for step, summary in zip(steps, summaries):
                for tag, _, value in _numbers(summary, prefix):
                    yield tag, int(step), value
            return
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(tree, bool):
        return
    elif isinstance(tree, int | float) or tree in _NON_FINITE:
        yield prefix, 0, float(tree)


def engines(runs: Sequence[RunLog]) -> dict[str, dict[str, Any]]:
    """Each run's engine decision as plain values."""
    found: dict[str, dict[str, Any]] = {}
    for run in runs:
        decision = run.learner.engine_decision
        found[run.name] = {"engine": run.learner.engine, **dataclasses.asdict(decision)}
    return found


def write_logs(
    formats: Sequence[str], runs: Sequence[RunLog], results: Mapping[str, Any], out: Path
) -> list[Path]:
    """Write the logs of a finished run under ``out/logs``; returns the files written."""
    rows = scalars(runs, results)
    decisions = engines(runs)
    config = dict(results.get("config", {}))
    written: list[Path] = []
    if "csv" in formats:
        written += _write_csv(out / "logs" / "csv", rows, decisions, config)
    if "tensorboard" in formats:
        written += _write_tensorboard(out / "logs" / "tensorboard", rows, decisions, config)
    return written


def _write_csv(folder: Path, rows: list[Scalar], decisions: dict[str, dict[str, Any]],
               config: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    metrics, engine_file, config_file = (folder / "metrics.csv", folder / "engines.csv",
                                         folder / "config.csv")
    with open(metrics, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "tag", "step", "value"])
        writer.writerows(rows)
    with open(engine_file, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "engine", "reason", "max_error", "timings"])
        for name, decision in decisions.items():
            writer.writerow([name, decision["engine"], decision["reason"],
                             decision["max_error"], json.dumps(decision["timings"])])
    with open(config_file, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["setting", "value"])
        writer.writerows((key, json.dumps(value)) for key, value in config.items())
    return [metrics, engine_file, config_file]


def _write_tensorboard(folder: Path, rows: list[Scalar], decisions: dict[str, dict[str, Any]],
                       config: dict[str, Any]) -> list[Path]:
    summary_writer = _summary_writer()
    names = list(dict.fromkeys([*decisions, *(run for run, *_ in rows)]))
    written = []
    for name in names:  # one folder per run: TensorBoard draws one line per run
        writer = summary_writer(log_dir=str(folder / name))
        for run, tag, step, value in rows:
            if run == name:  # NaN and infinities too: TensorBoard draws them
                writer.add_scalar(tag, value, global_step=step)
        if name in decisions:
            decision = decisions[name]
            writer.add_text("engine", f"**{decision['engine']}**: {decision['reason']}")
        writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
        writer.close()
        written += sorted((folder / name).glob("events.out.tfevents.*"))
    return written
