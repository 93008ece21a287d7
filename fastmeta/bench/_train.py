"""The benchmark's meta-training loop: checkpoints, resume, progress, divergence, signals."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import __version__
from .. import distributed as fmd
from .._learner import DivergenceError, MetaLearner
from ._checkpoint import CheckpointError, check_learner_payload, load_checkpoint, save_checkpoint
from ._device import to_device
from ._progress import Progress
from ._registry import load_state
from ._signals import Interrupted, StopFlag, signal_name


class TrainingDiverged(RuntimeError):
    """Meta-training stopped on a non-finite loss; the last good checkpoint is kept."""


@dataclass
class TrainingRecord:
    """What a training run measured; saved in checkpoints so resumed runs keep it.

    Attributes:
        iterations: meta-iterations done.
        seconds: wall time spent in this loop (summed over resumed runs).
        step_ms: median ``meta_step`` time of each logging window, in milliseconds.
        loss_curve: ``[iteration, mean meta-loss over the window]`` pairs.
        window_losses: losses of the window in progress (so a resumed run's curve is the
            same as an uninterrupted one's).
        skipped: meta-steps skipped on a float16 overflow (``--precision fp16``).
    """

    iterations: int = 0
    seconds: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    loss_curve: list[list[float]] = field(default_factory=list)
    window_losses: list[float] = field(default_factory=list)
    skipped: int = 0

    @property
    def ms_per_iteration(self) -> float | None:
        """Median over the windows of the median ``meta_step`` time."""
        return statistics.median(self.step_ms) if self.step_ms else None


@dataclass
class TrainingRun:
    """One learner to meta-train.

    Attributes:
        name: the run's name, also its checkpoint's stem (``"maml"``, ``"maml-5shot"``).
        learner: the learner, freshly built (weights are replaced on resume).
        optimizer: its outer optimiser.
        iterations: meta-iterations to run in total.
        batch: ``batch(i)`` gives the batch of meta-iteration ``i`` (0-based); it must be a
            pure function of ``i`` so that a resumed run sees the same tasks.
        checkpoint: where the checkpoint lives.
        spec: how to rebuild the learner (see ``_registry.build_learner``).
        config: the settings that determine this training; resuming checks they are
            unchanged.
        metadata: saved with the checkpoint, not checked on resume (e.g. the evaluation
            settings that ``fastmeta eval`` uses).
        schedule: a learning-rate scheduler of ``optimizer``, stepped after every
            meta-iteration and checkpointed, or ``None``.
    """

    name: str
    learner: MetaLearner
    optimizer: torch.optim.Optimizer
    iterations: int
    batch: Callable[[int], Any]
    checkpoint: Path
    spec: dict[str, Any]
    config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two configurations."""
    keys = sorted(set(saved) | set(current))
    return [key for key in keys if saved.get(key) != current.get(key)]


def describe_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """``"seed: 0 -> 1, inner_lr: 0.01 -> 0.02"`` (empty if equal)."""
    return ", ".join(
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in config_differences(saved, current)
    )


def _payload(run: TrainingRun, record: TrainingRecord) -> dict[str, Any]:
    return {
        "kind": "learner",
        "algorithm": run.spec.get("algorithm", run.name),
        "run": run.name,
        "spec": run.spec,
        "config": run.config,
        "metadata": run.metadata,
        "state_dict": run.learner.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict() if run.schedule is not None else None,
        "iteration": record.iterations,
        "iterations": run.iterations,
        "complete": record.iterations >= run.iterations,
        "record": asdict(record),
        "torch_rng": torch.get_rng_state(),
        "fastmeta_version": __version__,
    }


def check_resumable(run: TrainingRun, payload: dict[str, Any]) -> None:
    """Check that ``payload`` (read from ``run.checkpoint``) continues exactly this run.

    Raises:
        CheckpointError: the checkpoint is damaged, or belongs to another algorithm, learner
            or configuration; the message names the file, what differs and the fix.
    """
    path = run.checkpoint
    check_learner_payload(path, payload)
    saved_run = payload.get("run", payload.get("algorithm"))
    if saved_run != run.name:
        raise CheckpointError(
            f"{str(path)!r} holds the run {saved_run!r}, not {run.name!r}; the file was "
            f"renamed or copied. Move it away, or use a new --out directory"
        )
    details = describe_differences(payload.get("config", {}), run.config)
    if details:
        raise CheckpointError(
            f"--resume: {str(path)!r} was written with a different configuration ({details}); "
            f"rerun with the original settings, or use a new --out directory"
        )
    if payload["spec"] != run.spec:
        raise CheckpointError(
            f"--resume: {str(path)!r} was written for another learner "
            f"({describe_differences(payload['spec'], run.spec) or 'spec differs'}); rerun with "
            f"the original settings, or use a new --out directory"
        )
    for key in ("optimizer", "record", "torch_rng"):
        if key not in payload:
            raise CheckpointError(
                f"{str(path)!r} lacks its {key!r} entry, needed to resume; delete it to retrain "
                f"{run.name} from the start"
            )


def restore(run: TrainingRun) -> TrainingRecord:
    """Load ``run.checkpoint`` into the run's learner and optimiser; return its record.

    Raises:
        CheckpointError: the checkpoint does not continue this run (see
            :func:`check_resumable`), or its weights do not fit the learner.
    """
    payload = load_checkpoint(run.checkpoint)
    check_resumable(run, payload)
    load_state(run.learner, payload, run.checkpoint)
    try:
        run.optimizer.load_state_dict(payload["optimizer"])
        if run.schedule is not None and payload.get("schedule") is not None:
            run.schedule.load_state_dict(payload["schedule"])
        record = TrainingRecord(**payload["record"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{str(run.checkpoint)!r}: its optimiser state does not fit ({error}); delete it to "
            f"retrain {run.name} from the start"
        ) from None
    torch.set_rng_state(payload["torch_rng"])
    run.learner.meta_steps_taken = record.iterations
    return record


def train(
    run: TrainingRun,
    *,
    resume: bool = False,
    checkpoint_every: int = 1000,
    write: bool = True,
    progress: bool = True,
    stop: StopFlag | None = None,
    stop_after: int | None = None,
) -> TrainingRecord:
    """Meta-train ``run.learner`` for ``run.iterations`` meta-iterations.

    Args:
        run: what to train.
        resume: continue from ``run.checkpoint`` if it exists.
        checkpoint_every: write a checkpoint every this many meta-iterations (and at the end).
        write: write checkpoints at all (``False`` on all but one distributed rank).
        progress: show a progress line.
        stop: a flag set by SIGINT/SIGTERM; the loop stops after the current meta-iteration.
        stop_after: stop after this meta-iteration, as if interrupted (for tests).

    Returns:
        The record of the whole training (including resumed parts).

    Raises:
        TrainingDiverged: a meta-step had a non-finite loss; the last checkpoint is kept.
        Interrupted: ``stop`` was set or ``stop_after`` reached; a checkpoint was written.
    """
    record = restore(run) if resume and run.checkpoint.exists() else TrainingRecord()
    if record.iterations >= run.iterations:
        return record
    if stop is not None and stop.requested:  # stopped before this run began: nothing to save
        raise Interrupted(
            f"{run.name}: stopped by {signal_name(stop.signum)} before meta-iteration "
            f"{record.iterations + 1}. Continue with --resume.", signum=stop.signum,
        )
    distributed = fmd.is_distributed()
    if distributed:  # each rank trains on its share of every meta-batch
        fmd.data_parallel(run.learner)
        write = write and fmd.is_main_process()
        progress = progress and fmd.is_main_process()
    window = max(1, run.iterations // 200)
    bar = Progress(run.iterations, run.name, start=record.iterations, enabled=progress)
    times: list[float] = []
    segment_start = time.perf_counter()
    last_saved = record.iterations

    def checkpoint() -> None:
        nonlocal segment_start, last_saved
        now = time.perf_counter()
        record.seconds += now - segment_start
        segment_start = now
        if write:
            save_checkpoint(run.checkpoint, _payload(run, record))
        last_saved = record.iterations

    for iteration in range(record.iterations, run.iterations):
        batch = run.batch(iteration)
        batch = to_device(fmd.shard(batch) if distributed else batch, run.learner.device)
        tick = time.perf_counter()
        try:
            result = run.learner.meta_step(batch, run.optimizer)
        except DivergenceError as error:
            bar.close()
            kept = (
                f"the last good checkpoint (meta-iteration {last_saved}) is {run.checkpoint}"
                if write and run.checkpoint.exists()
                else "no checkpoint was written before it"
            )
            raise TrainingDiverged(
                f"{run.name}: meta-training diverged at meta-iteration {iteration + 1}: {error}. "
                f"Stopped; {kept}."
            ) from error
        if run.schedule is not None:
            run.schedule.step()
        times.append(time.perf_counter() - tick)
        if result.skipped:  # a float16 overflow (precision fp16): no update, no loss
            record.skipped += 1
        else:
            record.window_losses.append(result.loss)
        record.iterations = iteration + 1
        if record.iterations % window == 0 or record.iterations == run.iterations:
            if record.window_losses:
                record.loss_curve.append([record.iterations,
                                          statistics.fmean(record.window_losses)])
            record.step_ms.append(1000 * statistics.median(times))
            record.window_losses.clear()
            times.clear()
        bar.update(record.iterations, result.loss)
        stopping = (stop is not None and stop.requested) or (
            stop_after is not None and record.iterations >= stop_after
        )
        if distributed:  # stop together: a rank that stopped alone would hang the others
            stopping = _any_rank(stopping)
        if record.iterations % checkpoint_every == 0 or stopping:
            checkpoint()
        if stopping and record.iterations < run.iterations:
            bar.close()
            signum = stop.signum if stop is not None else None
            by = f" by {signal_name(signum)}" if signum is not None else ""
            raise Interrupted(
                f"{run.name}: stopped{by} after meta-iteration {record.iterations} of "
                f"{run.iterations}; checkpoint {run.checkpoint}. Continue with --resume.",
                signum=signum,
            )
    if last_saved != record.iterations:
        checkpoint()
    bar.close()
    return record


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any process of the job."""
    value = torch.tensor([int(flag)], device=fmd.device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def save_untrained(run: TrainingRun, *, resume: bool = False) -> TrainingRecord:
    """Checkpoint a learner that is not trained (the random-initialisation baseline).

    With ``resume`` and an existing checkpoint, that checkpoint is checked and loaded.
    """
    if resume and run.checkpoint.exists():
        return restore(run)
    record = TrainingRecord()
    if fmd.is_main_process():
        save_checkpoint(run.checkpoint, _payload(run, record))
    return record
