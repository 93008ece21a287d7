"""One runner for every benchmark: check the output directory, train, evaluate, write.

Before anything trains, the output directory is created and checked writable, locked
against a second run, cleared of a killed run's temporary files, and every checkpoint in
it is checked against the configuration (with ``--resume``; without it, a directory that
holds a run is refused). Results are merged per algorithm into ``results.json``, so a
``--resume`` over some algorithms keeps the others' numbers.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import distributed as fmd
from .._precision import autocast
from . import _plots
from ._checkpoint import CheckpointError, check_learner_payload, load_checkpoint
from ._config import BenchConfig, dumps, versions
from ._device import resolve_device, resolve_precision
from ._loggers import RunLog, check_log_formats, write_logs
from ._outdir import RunLock, check_out, clean_temporaries, write_text
from ._protocol import Benchmark, Outcome, RunPlan
from ._registry import build_learner, load_learner, load_state
from ._signals import Interrupted, StopFlag
from ._train import (
    TrainingRecord,
    TrainingRun,
    check_resumable,
    describe_differences,
    save_untrained,
    train,
)

# Settings that may differ between runs sharing one output directory.
PER_INVOCATION = ("algorithms", "checkpoint_every")


def _merge_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in PER_INVOCATION}


def training_summary(record: TrainingRecord) -> dict[str, Any]:
    """What ``results.json`` records of one training."""
    return {
        "iterations": record.iterations,
        "seconds": record.seconds,
        "ms_per_iteration": record.ms_per_iteration,
        "final_meta_loss": record.loss_curve[-1][1] if record.loss_curve else None,
        "loss_curve": record.loss_curve,
        "skipped_steps": record.skipped,
    }


def _training_run(benchmark: Benchmark, config: BenchConfig, plan: RunPlan,
                  checkpoints: Path, device: torch.device, precision: str) -> TrainingRun:
    seed = config.seed if plan.seed is None else plan.seed
    learner = build_learner(plan.spec, seed=seed).to(device)
    learner.precision = precision
    optimizer = plan.optimizer(learner.parameters())
    return TrainingRun(
        plan.name, learner, optimizer, plan.iterations, plan.batches(),
        checkpoints / f"{plan.name}.pt", plan.spec, plan.training,
        metadata={"config": plan.evaluation, "precision": precision},
        schedule=plan.schedule(optimizer) if plan.schedule is not None else None,
    )


def _check_checkpoints(benchmark: Benchmark, config: BenchConfig, runs: list[TrainingRun],
                       checkpoints: Path, resume: bool) -> None:
    """Refuse, before training, any checkpoint in ``checkpoints`` this run cannot continue."""
    existing = sorted(checkpoints.glob("*.pt"))
    if not resume:
        if existing:
            raise FileExistsError(
                f"{checkpoints.parent} already holds checkpoints from a run "
                f"({', '.join(p.name for p in existing[:3])}); pass --resume to continue it, "
                f"or choose another --out directory"
            )
        return
    mine = {run.checkpoint: run for run in runs}
    for path in existing:
        payload = load_checkpoint(path)
        if path in mine:  # continues this run: same algorithm, learner, settings, shapes
            run = mine[path]
            check_resumable(run, payload)
            load_state(build_learner(run.spec), payload, path)
            continue
        check_learner_payload(path, payload)  # another algorithm's: same shared settings
        if payload["spec"]["benchmark"] != benchmark.name:
            raise CheckpointError(
                f"--resume: {str(path)!r} is from `fastmeta bench "
                f"{payload['spec']['benchmark']}`, not {benchmark.name}; use another --out"
            )
        try:
            saved = benchmark.config.from_dict(payload["metadata"]["config"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"--resume: {str(path)!r} has no readable configuration ({error}); the file "
                f"is damaged or from another version: move it away, or use a new --out"
            ) from None
        expected = _expected_config(benchmark, config, payload["spec"]["algorithm"], path.stem)
        details = describe_differences(saved.shared_dict(), expected.shared_dict())
        if details:
            raise CheckpointError(
                f"--resume: {str(path)!r}, another algorithm's checkpoint in this --out, was "
                f"written with different settings ({details}); every run into one --out must "
                f"share them. Rerun with the original settings, or use a new --out directory"
            )


def _expected_config(benchmark: Benchmark, config: BenchConfig, algorithm: str,
                     name: str) -> BenchConfig:
    """The configuration this run would give checkpoint ``name`` of ``algorithm`` (with
    ``--seeds``, that run's own seed); ``config`` when no run of this plan has that name."""
    try:
        plans = benchmark.plan(config.replace(algorithms=(algorithm,)))
    except (TypeError, ValueError):  # an algorithm this benchmark no longer offers
        return config
    for plan in plans:
        if plan.name == name:
            return benchmark.config.from_dict(plan.evaluation)
    return config


def _previous_results(benchmark: Benchmark, config: BenchConfig, out: Path,
                      resume: bool) -> dict[str, Any] | None:
    """The ``results.json`` this run merges into, after checking it fits."""
    path = out / "results.json"
    if not path.exists():
        return None
    if not resume:
        raise FileExistsError(
            f"{out} already holds results.json from a run; pass --resume to continue it, or "
            f"choose another --out directory"
        )
    try:
        previous = json.loads(path.read_text())
        settings = previous["config"]
        algorithms = previous["algorithms"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{str(path)!r} is not a results.json of `fastmeta bench` ({error}); move it away "
            f"to start the results afresh"
        ) from None
    if previous.get("benchmark") != benchmark.name:
        raise CheckpointError(
            f"--resume: {str(path)!r} is from `fastmeta bench {previous.get('benchmark')}`, not "
            f"{benchmark.name}; use another --out"
        )
    kept = [name for name in algorithms if name not in config.algorithms]
    details = describe_differences(_merge_settings(settings), _merge_settings(config.as_dict()))
    if kept and details:
        raise CheckpointError(
            f"--resume: {str(path)!r} holds {', '.join(kept)} run with different settings "
            f"({details}); merging them would mix two protocols in one table. Rerun with the "
            f"original settings, include every algorithm ({','.join([*config.algorithms, *kept])}"
            f"), or use a new --out directory"
        )
    return previous


def _agree(error: BaseException | None) -> None:
    """Raise ``error`` on rank 0 and a pointer to it on the other ranks (one all-reduce)."""
    if fmd.is_distributed():
        failed = torch.tensor([int(error is not None)], device=fmd.device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise RuntimeError("rank 0 refused to start the run; see its error message")
    if error is not None:
        raise error


def final_line(name: str, record: TrainingRecord) -> str:
    """The line after a run's training: what its loss and time are, not just their values.

    The progress line shows the last meta-loss and the wall time per iteration; this one
    the mean meta-loss of the last logging window and the median ``meta_step`` time.
    """
    curve = record.loss_curve
    window = curve[-1][0] - (curve[-2][0] if len(curve) > 1 else 0)
    return (f"{name}: {record.iterations:,} meta-iterations; meta-loss {curve[-1][1]:.4f} "
            f"(mean of the last {window:,}); {record.ms_per_iteration:.2f} ms per meta_step "
            f"(median, without data loading and checkpoints)")


def run_benchmark(
    benchmark: Benchmark,
    config: BenchConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    stop: StopFlag | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    log_to: Sequence[str] = (),
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Meta-train, evaluate and write ``results.json``, ``results.md`` and the figures.

    Args:
        benchmark: what to run (see :func:`fastmeta.bench.benchmark`).
        config: its settings (an instance of ``benchmark.config``).
        out: output directory (checkpoints go to ``out/checkpoints``).
        resume: continue from the checkpoints in ``out`` (each is checked first).
        progress: show progress lines.
        plots: write the PNG figures (needs matplotlib, checked before training).
        stop: set by SIGINT/SIGTERM: training stops after the current meta-iteration
            with a checkpoint; during evaluation it stops at once.
        stop_after: stop each run's training after this meta-iteration (for tests).
        log: where status lines go.
        log_to: also write the curves, evaluation, engines and configuration for these
            tools: ``"csv"``, ``"tensorboard"`` (under ``out/logs``; see
            :func:`fastmeta.bench.write_logs`).
        device: where the learners train and are evaluated (a ``torch.device`` or a
            ``--device`` name such as ``"auto"``); ``None``: this process's device in a
            ``torchrun`` job (``cuda:LOCAL_RANK`` under NCCL), else the CPU.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (the learners' ``precision``);
            both are recorded in ``results.json``.

    Under ``torchrun`` every process trains on its share of each meta-batch (see
    :mod:`fastmeta.distributed`); only rank 0 checks and writes the output directory,
    evaluates and writes results (the others return the training part).

    Returns:
        The content of ``results.json`` (numbers as floats; non-finite ones are written as
        the strings ``"nan"``, ``"inf"``, ``"-inf"``).

    Raises:
        OutDirError: ``out`` is a file, cannot be created or is not writable.
        RunLocked: another run is using ``out``.
        FileExistsError: ``out`` holds a run and ``resume`` is false.
        CheckpointError: a checkpoint (or ``results.json``) in ``out`` does not fit.
        TrainingDiverged: a meta-training run diverged (its last good checkpoint is kept).
        Interrupted: stopped by a signal or ``stop_after``; rerun with ``resume=True``.
    """
    if not isinstance(config, benchmark.config):
        raise TypeError(
            f"config must be a {benchmark.config.__name__} for `bench {benchmark.name}`, got "
            f"{type(config).__name__}"
        )
    if plots and benchmark.figures is not None:
        _plots.pyplot()  # fail before hours of training, not after
    log_to = check_log_formats(log_to)  # likewise
    device = fmd.device() if device is None else (
        device if isinstance(device, torch.device) else resolve_device(device))
    precision = resolve_precision(precision)
    out = Path(out)
    checkpoints = out / "checkpoints"
    main = fmd.is_main_process()
    plans = benchmark.plan(config)
    with contextlib.ExitStack() as stack:
        error: BaseException | None = None
        runs: list[TrainingRun] = []
        previous = None
        try:
            if main:
                outputs = ["results.json", "results.md", *benchmark.figure_names,
                           *(f"checkpoints/{plan.name}.pt" for plan in plans)]
                check_out(out, outputs)
                lock = stack.enter_context(RunLock(out))
                if lock.took_over is not None:
                    log(f"took over the lock of a run that is gone (pid "
                        f"{lock.took_over.get('pid')}, started {lock.took_over.get('started')})")
                for path in clean_temporaries(out):
                    log(f"removed {path}, a temporary file of an interrupted write")
            runs = [_training_run(benchmark, config, plan, checkpoints, device, precision)
                    for plan in plans]
            if main:
                _check_checkpoints(benchmark, config, runs, checkpoints, resume)
                previous = _previous_results(benchmark, config, out, resume)
        except Exception as caught:  # every rank must hear of it before training
            error = caught
        _agree(error)
        return _train_and_evaluate(benchmark, config, out, plans, runs, previous,
                                   resume=resume, progress=progress, plots=plots, stop=stop,
                                   stop_after=stop_after, log=log, log_to=log_to)


def _train_and_evaluate(
    benchmark: Benchmark,
    config: BenchConfig,
    out: Path,
    plans: list[RunPlan],
    runs: list[TrainingRun],
    previous: dict[str, Any] | None,
    *,
    resume: bool,
    progress: bool,
    plots: bool,
    stop: StopFlag | None,
    stop_after: int | None,
    log: Callable[[str], None],
    log_to: Sequence[str] = (),
) -> dict[str, Any]:
    started = time.perf_counter()
    records = []
    for run in runs:
        if run.iterations == 0:
            records.append(save_untrained(run, resume=resume))
            continue
        record = train(run, resume=resume, checkpoint_every=config.checkpoint_every,
                       progress=progress, stop=stop, stop_after=stop_after)
        log(final_line(run.name, record))
        records.append(record)
    if not fmd.is_main_process():  # rank 0 evaluates and writes
        return {"benchmark": benchmark.name, "config": config.as_dict(),
                "training": {run.name: training_summary(r) for run, r in zip(runs, records)}}
    evaluations = _evaluate_all(benchmark, plans, runs, out, stop, log)
    outcomes: dict[str, list[Outcome]] = {}
    for plan, run, record, evaluation in zip(plans, runs, records, evaluations):
        outcome = Outcome(plan, str(run.checkpoint.relative_to(out)), training_summary(record),
                          evaluation)
        outcomes.setdefault(plan.algorithm, []).append(outcome)
    entries = {algorithm: benchmark.entry(config, algorithm, found)
               for algorithm, found in outcomes.items()}
    kept = {name: entry for name, entry in (previous or {}).get("algorithms", {}).items()
            if name not in entries}
    order = [name for name in benchmark.algorithms if name in entries or name in kept]
    merged = {**kept, **entries}
    learner = runs[0].learner
    results: dict[str, Any] = {
        "benchmark": benchmark.name,
        "config": {**config.as_dict(), "algorithms": order},
        "device": str(learner.device),
        "precision": learner.precision,
        "versions": versions(),
        "algorithms": {name: merged[name] for name in order},
    }
    if benchmark.summary is not None:
        results.update(benchmark.summary(results))
    figures: list[str] = []
    if plots and benchmark.figures is not None:
        learners = {run.name: run.learner for run in runs}
        if kept:  # figures show every algorithm of results.json: load the others
            others = config.replace(algorithms=tuple(kept))
            for plan in benchmark.plan(others):
                learners[plan.name] = load_learner(out / "checkpoints" / f"{plan.name}.pt")[0]
        merged_config = config.replace(algorithms=tuple(order))
        figures = [str(Path(p).relative_to(out))
                   for p in benchmark.figures(learners, results, merged_config, out)]
    results["figures"] = figures
    results["wall_seconds"] = time.perf_counter() - started
    write_results(benchmark, results, out)
    if log_to:
        runs_logged = [RunLog(run.name, record.loss_curve, run.learner)
                       for run, record in zip(runs, records)]
        for path in write_logs(log_to, runs_logged, results, out):
            log(f"wrote {path}")
    return results


def _evaluate_all(benchmark: Benchmark, plans: list[RunPlan], runs: list[TrainingRun],
                  out: Path, stop: StopFlag | None,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    evaluating = stop.evaluation() if stop is not None else contextlib.nullcontext()
    evaluations = []
    try:
        with evaluating:
            for plan, run in zip(plans, runs):
                settings = benchmark.config.from_dict(plan.evaluation)
                log(f"evaluating {plan.name}")
                with autocast(run.learner.precision, run.learner.device):
                    evaluations.append(benchmark.evaluate(run.learner, plan.algorithm,
                                                          settings))
    except Interrupted as error:
        raise Interrupted(
            f"{error} (after {len(evaluations)} of {len(runs)} learners); the checkpoints in "
            f"{out / 'checkpoints'} are kept: rerun with --resume to evaluate them without "
            f"training again", signum=error.signum,
        ) from None
    return evaluations


def write_results(benchmark: Benchmark, results: dict[str, Any], out: Path) -> None:
    """Write ``results.json`` (strict JSON) and ``results.md`` atomically into ``out``."""
    text = dumps(results)
    write_text(out / "results.json", text + "\n")
    write_text(out / "results.md", benchmark.markdown(json.loads(text)))
