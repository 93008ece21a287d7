"""``fastmeta eval CHECKPOINT``: evaluate a saved learner on its benchmark's held-out tasks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .._precision import autocast
from ._checkpoint import CheckpointError
from ._device import resolve_device, resolve_precision
from ._protocol import benchmark as find_benchmark
from ._protocol import names
from ._registry import load_learner


def _progress(payload: dict[str, Any]) -> tuple[int, int]:
    """Meta-iterations done and planned (checkpoints before ``iterations`` was saved: from
    their ``complete`` flag and configuration)."""
    done = int(payload.get("iteration", 0))
    total = payload.get("iterations")
    if total is None:
        complete = payload.get("complete", True)
        total = done if complete else payload["metadata"]["config"]["iterations"]
    return done, int(total)


def _check_plot_dir(plot_dir: Path) -> None:
    """Refuse a figure directory that is a file, or lies under one."""
    for folder in (plot_dir, *plot_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(
                f"--out {str(plot_dir)!r}: {str(folder)!r} is a file, but --plot writes its "
                f"figures into a directory; pass a directory (new or existing) as --out"
            )


def evaluate_checkpoint(
    path: Path | str,
    *,
    shots: Sequence[int] | None = None,
    steps: int | None = None,
    tasks: int | None = None,
    plot_dir: Path | None = None,
    device: torch.device | str = "cpu",
    precision: str | None = None,
) -> dict[str, Any]:
    """Fine-tune the learner saved at ``path`` on held-out tasks and summarise the results.

    Without overrides this evaluates exactly as the ``fastmeta bench`` run that wrote the
    checkpoint did (same tasks, same settings), so it reproduces that run's numbers. The
    benchmark is found in the checkpoint's spec, through the same registry as ``fastmeta
    bench``.

    Args:
        path: a checkpoint from ``OUT/checkpoints/``.
        shots: support points (regression) or images per class (classification).
        steps: fine-tuning steps (evaluated after 0 through ``steps``, where the benchmark
            reports curves).
        tasks: number of held-out tasks.
        plot_dir: also write figures there.
        device: where to evaluate (a ``torch.device`` or a ``--device`` name: ``"auto"``,
            ``"cpu"``, ``"cuda"``, ...).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``; default: the precision the
            checkpoint was trained in (``"fp32"`` for checkpoints that do not say).

    Returns:
        ``{"benchmark", "algorithm", "checkpoint", "iteration", "iterations", "complete",
        "device", "precision", "evaluation", "text", "figures"}``: ``evaluation`` has the
        layout of the algorithm's ``evaluation`` in ``results.json``; ``text`` is the
        printable table, which starts with a note if the checkpoint is partial (training
        was interrupted).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: ``path`` is not a usable checkpoint.
        ValueError: an override this benchmark does not take, or ``plot_dir`` is a file.
    """
    path = Path(path)
    if plot_dir is not None:  # before minutes of evaluation
        _check_plot_dir(Path(plot_dir))
    device = device if isinstance(device, torch.device) else resolve_device(device)
    learner, payload = load_learner(path)
    learner.to(device)
    saved = payload.get("metadata", {}).get("precision", "fp32")
    learner.precision = resolve_precision(saved if precision is None else precision)
    spec = payload["spec"]
    if spec["benchmark"] not in names():
        raise CheckpointError(
            f"{str(path)!r}: its spec names the benchmark {spec['benchmark']!r}, which this "
            f"fastmeta does not have (it has {', '.join(names())}); upgrade fastmeta"
        )
    bench = find_benchmark(spec["benchmark"])
    algorithm = spec["algorithm"]
    overrides = {"shots": tuple(shots) if shots is not None else None, "steps": steps,
                 "tasks": tasks}
    settings = dict(payload.get("metadata", {}).get("config", {}))
    for option, value in overrides.items():
        if value is None:
            continue
        if option not in bench.eval_options:
            raise ValueError(
                f"--{option} does not apply to `bench {bench.name}` checkpoints; it takes "
                f"{', '.join('--' + o for o in bench.eval_options) or 'no overrides'}"
            )
        settings[bench.eval_options[option]] = list(value) if isinstance(value, tuple) else value
    settings["algorithms"] = [algorithm]
    try:
        config = bench.config.from_dict(settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: cannot evaluate with these settings: {error}") from None
    with autocast(learner.precision, learner.device):
        evaluation = bench.evaluate(learner, algorithm, config)
    text = bench.eval_text(algorithm, evaluation, config)
    done, total = _progress(payload)
    complete = done >= total
    if not complete:
        text = (
            f"note: {path} is a partial checkpoint: {algorithm} trained {done:,} of "
            f"{total:,} meta-iterations (the run was interrupted); continue it with "
            f"`fastmeta bench {bench.name} --resume --out OUT` using the run's settings\n"
            + text
        )
    figures: list[str] = []
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        figures = [str(p) for p in bench.eval_figures(learner, algorithm, evaluation, config,
                                                        plot_dir)]
        text += "\nwrote " + ", ".join(figures)
    return {
        "benchmark": bench.name,
        "algorithm": algorithm,
        "checkpoint": str(path),
        "iteration": done,
        "iterations": total,
        "complete": complete,
        "device": str(learner.device),
        "precision": learner.precision,
        "evaluation": evaluation,
        "text": text,
        "figures": figures,
    }
