"""Throughput of sine MAML: fastmeta's engines side by side with hand-written references.

Usage:
    python benchmarks/throughput.py --quick            # under a minute: few repeats, no compile
    python benchmarks/throughput.py                    # the full table (compiles 4 cases: minutes)
    python benchmarks/throughput.py --repeats 50 --threads 1 --no-compile --no-memory
    python benchmarks/throughput.py --json results.json

The configuration is the sine benchmark of the MAML paper: MLP 1-40-40-1 (ReLU),
meta-batch 25, K=10 support and 10 query points per task, inner SGD with
``inner_lr=0.01``, Adam(1e-3) outer step, float32, CPU, 1 thread by default. It is
timed at 1 and 5 inner steps, first and second order, for:

- fastmeta with ``engine="auto"``, ``"vmap"``, ``"vmap"`` + ``compile=True`` and ``"higher"``;
- a plain higher ``innerloop_ctx`` loop, written here (the usual user code);
- a hand-written ``torch.func`` loop, written here: ``functional_call`` +
  ``torch.func.grad`` for the inner steps + ``vmap`` over the tasks, then Adam.

A fastmeta variant whose constructor rejects its arguments (``TypeError`` or
``ValueError``, e.g. an engine that does not exist yet) is reported as
``unavailable: <reason>``, not timed. Any other error ends the run. Warnings that
fastmeta raises while a learner is built or takes its first step (an engine fallback, a
failed compile) are listed under the table, so that a row never hides what really ran.

Method:
    1. Every implementation gets a copy of the same initial model and its own Adam.
    2. Correctness: each one takes its first meta-step on the same batch; its
       meta-gradient (left in ``.grad``) is compared with the hand-written
       ``torch.func`` loop's (relative L2 error over all parameters; flagged above 1e-4,
       float32). That first call is also the compile warm-up of a compiled learner,
       reported as its compile time.
    3. ``--warmup`` more meta-steps each; ``auto`` more until its tuner has chosen (its
       first meta-steps time every exact candidate, the slower ones too).
    4. ``--repeats`` rounds; each round draws one batch and times one meta-iteration of
       every implementation on it, in an order drawn afresh each round, so that the
       machine's noise, and the slowdown of a step run right after a long one, hit all
       of them alike. Times are medians over rounds; ratios are
       medians of the per-round ratios (paired on the same batch, measured seconds apart).

Peak memory (``--no-memory`` skips it): 10 inner steps, meta-batch 100, second order,
for fastmeta's default engine, the hand-written ``torch.func`` loop and the higher loop.
Each runs in a fresh subprocess of this script, which builds the model and takes one
meta-step on a 2-task batch (so that lazy initialisation is not counted), then resets
the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``), reads
the resident set size (``VmRSS`` in ``/proc/self/status``) as the baseline, takes one
full meta-step, and reads the high-water mark (``VmHWM``). Peak memory is the
high-water mark minus the baseline: what the meta-step added on top of the process,
tensors and allocator overhead included; the median of 3 fresh processes (1 with
``--quick``). ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not used where /proc is
available: it cannot be reset, and on Linux a child inherits its parent's value across
fork + exec, which hides a small step under the benchmark's own footprint; it is the
fallback elsewhere, reported as "bound only". torch has no allocator statistics on CPU,
and the profiler's memory events give no timeline without private APIs, hence the
process-level measure.

Speed targets (second order, 1 inner step, 1 thread): fastmeta's default
engine >= 10x the higher loop and >= 0.9x the hand-written ``torch.func`` loop;
``compile=True`` >= 25x the higher loop; fastmeta's ``higher`` engine >= 0.9x the higher
loop; peak memory of the default engine <= 1.2x the hand-written loop. They are checked
in a "Targets" section (PASS / MISS / SKIP); a missed target does not change the exit
status (0), an error does.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import higher
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fastmeta

INNER_LR = 0.01
OUTER_LR = 1e-3
META_BATCH = 25
SHOTS = 10
QUERY = 10
GRAD_TOLERANCE = 1e-4  # relative L2 error of the meta-gradient, float32
MAX_TUNING_STEPS = 20  # auto's tuner chooses after 7 meta-steps per batch shape

# (inner_steps, first_order), in the column order of the README's throughput table.
CASES: tuple[tuple[int, bool], ...] = ((1, False), (1, True), (5, False), (5, True))
TARGET_CASE = (1, False)

MEMORY_STEPS = 10
MEMORY_META_BATCH = 100
MEMORY_IMPLS = ("fastmeta-auto", "torchfunc-vmap", "higher-loop")

# Warnings of these kinds from torch or higher internals are noise here; fastmeta's own
# warnings (and any warning attributed to this script by a stacklevel) are reported.
_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, SyntaxWarning)
_FASTMETA_DIR = Path(fastmeta.__file__).resolve().parent

# key -> table label; the first two are the references every ratio is taken against.
LABELS: dict[str, str] = {
    "higher-loop": "higher `innerloop_ctx` loop (reference)",
    "torchfunc-vmap": "torch.func `vmap` loop (reference)",
    "fastmeta-auto": "fastmeta `auto`",
    "fastmeta-vmap": "fastmeta `vmap`",
    "fastmeta-vmap-compile": "fastmeta `vmap` + compile",
    "fastmeta-higher": "fastmeta `higher`",
}
# key -> MAML keyword arguments of the fastmeta variants.
FASTMETA_VARIANTS: dict[str, dict[str, Any]] = {
    "fastmeta-auto": {"engine": "auto"},
    "fastmeta-vmap": {"engine": "vmap"},
    "fastmeta-vmap-compile": {"engine": "vmap", "compile": True},
    "fastmeta-higher": {"engine": "higher"},
}


def case_name(case: tuple[int, bool]) -> str:
    """Column title of a case, e.g. ``"2nd order, 1 step"``."""
    steps, first_order = case
    return f"{'1st' if first_order else '2nd'} order, {steps} step{'s' if steps > 1 else ''}"


def case_key(case: tuple[int, bool]) -> str:
    """JSON key of a case, e.g. ``"steps1-second"``."""
    steps, first_order = case
    return f"steps{steps}-{'first' if first_order else 'second'}"


# ---------------------------------------------------------------------------- data and model


def sine_batch(
    seed: int, tasks: int = META_BATCH, shots: int = SHOTS, query: int = QUERY
) -> fastmeta.TaskBatch:
    """A meta-batch of sine regression tasks, as in the MAML paper.

    Amplitude ~ U[0.1, 5], phase ~ U[0, π], x ~ U[-5, 5], y = A·sin(x − φ).

    Args:
        seed: seed of the batch's own generator (same seed, same batch).
        tasks: number of tasks.
        shots: support points per task.
        query: query points per task.

    Returns:
        A ``fastmeta.TaskBatch`` of float32 tensors ``[tasks, points, 1]``.
    """
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.empty(tasks, 1, 1).uniform_(0.1, 5.0, generator=g)
    phase = torch.empty(tasks, 1, 1).uniform_(0.0, math.pi, generator=g)
    x = torch.empty(tasks, shots + query, 1).uniform_(-5.0, 5.0, generator=g)
    y = amplitude * torch.sin(x - phase)
    return fastmeta.TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def initial_model() -> nn.Module:
    """The sine network (1-40-40-1 ReLU), with the same weights on every call."""
    torch.manual_seed(0)
    return fastmeta.models.SineMLP()


# ---------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    """One way of running a MAML meta-iteration.

    Attributes:
        key: short name (a key of ``LABELS``).
        step: runs one full meta-iteration (meta-gradient and Adam step) on a task batch and
            returns the meta-loss; leaves the meta-gradient in ``.grad`` of ``parameters``.
        parameters: the meta-parameters, in ``named_parameters()`` order.
        engine: the engine fastmeta reports (``learner.engine``), or ``None`` for a reference.
        notes: warnings raised while building it or during its first step.
    """

    key: str
    step: Callable[[Any], float]
    parameters: list[Tensor]
    engine: str | None = None
    notes: list[str] = field(default_factory=list)
    # fastmeta "auto": whether its tuner has chosen (its first meta-steps time every
    # exact candidate, the slow ones too, and must not be timed as the default's speed)
    tuned: Callable[[], bool] = lambda: True


class Unavailable(Exception):
    """A fastmeta variant whose constructor rejected its arguments."""


class HigherLoop:
    """The plain higher loop a typical user writes (not fastmeta's code).

    One ``innerloop_ctx(copy_initial_weights=False)`` per task, inner SGD, and a
    backward of ``query_loss / tasks`` per task, so that only one task's graph is alive.
    First order: ``diffopt.step(loss, grad_callback=...)`` detaching the inner gradients,
    with ``track_higher_grads`` left ``True``: the form higher's users settled on
    (facebookresearch/higher issues #63, #102, #128), since ``track_higher_grads=False``
    gives no meta-gradient at all.

    Args:
        model: the network (meta-trained in place).
        inner_steps: inner SGD steps per task.
        first_order: detach the inner gradients.
    """

    def __init__(self, model: nn.Module, inner_steps: int, first_order: bool) -> None:
        self.model = model
        self.inner_steps = inner_steps
        self.grad_callback = _detach_grads if first_order else None
        self.inner_optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

    def step(self, task: Any) -> float:
        """One meta-iteration; returns the mean query loss."""
        self.optimizer.zero_grad(set_to_none=True)
        num_tasks = task.support_x.shape[0]
        total = torch.zeros(())
        for i in range(num_tasks):
            with higher.innerloop_ctx(
                self.model, self.inner_optimizer, copy_initial_weights=False
            ) as (fmodel, diffopt):
                for _ in range(self.inner_steps):
                    support_loss = F.mse_loss(fmodel(task.support_x[i]), task.support_y[i])
                    diffopt.step(support_loss, grad_callback=self.grad_callback)
                query_loss = F.mse_loss(fmodel(task.query_x[i]), task.query_y[i])
                (query_loss / num_tasks).backward()
                total += query_loss.detach()
        self.optimizer.step()
        return float(total) / num_tasks


def _detach_grads(grads: list[Tensor]) -> list[Tensor]:
    return [g.detach() for g in grads]


class TorchFuncLoop:
    """A hand-written vectorised MAML step with ``torch.func`` (not fastmeta's code).

    Per task: ``φ ← φ − α·torch.func.grad(L_support)(φ)`` from ``φ = θ``; the inner
    gradient keeps its graph for second order (``torch.func.grad`` composes with the outer
    autograd) and is detached for first order. ``vmap`` runs all tasks at once; the mean
    query loss is backpropagated to θ and Adam steps.

    Args:
        model: the network (meta-trained in place).
        inner_steps: inner SGD steps per task.
        first_order: detach the inner gradients.
    """

    def __init__(self, model: nn.Module, inner_steps: int, first_order: bool) -> None:
        self.model = model
        self.params: dict[str, Tensor] = dict(model.named_parameters())
        self.optimizer = torch.optim.Adam(model.parameters(), lr=OUTER_LR)

        def loss_at(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.mse_loss(functional_call(model, params, (x,)), y)

        support_grad = torch.func.grad(loss_at)

        def task_loss(
            params: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
        ) -> Tensor:
            fast = params
            for _ in range(inner_steps):
                grads = support_grad(fast, sx, sy)
                if first_order:
                    grads = {name: g.detach() for name, g in grads.items()}
                fast = {name: fast[name] - INNER_LR * grads[name] for name in fast}
            return loss_at(fast, qx, qy)

        self.batched_loss = torch.func.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))

    def step(self, task: Any) -> float:
        """One meta-iteration; returns the mean query loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.batched_loss(self.params, *task).mean()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def build(key: str, inner_steps: int, first_order: bool) -> Impl:
    """Build implementation ``key`` on a fresh copy of the initial model.

    Raises:
        Unavailable: a fastmeta variant's constructor raised ``TypeError``/``ValueError``.
    """
    model = copy.deepcopy(initial_model())
    if key == "higher-loop":
        loop = HigherLoop(model, inner_steps, first_order)
        return Impl(key, loop.step, list(model.parameters()))
    if key == "torchfunc-vmap":
        vloop = TorchFuncLoop(model, inner_steps, first_order)
        return Impl(key, vloop.step, list(model.parameters()))
    options = FASTMETA_VARIANTS[key]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            learner = fastmeta.MAML(
                model,
                inner_lr=INNER_LR,
                inner_steps=inner_steps,
                first_order=first_order,
                **options,
            )
        except (TypeError, ValueError) as error:
            raise Unavailable(f"{type(error).__name__}: {error}") from error
    optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)

    def step(task: Any) -> float:
        return learner.meta_step(task, optimizer).loss

    notes = [_describe(w) for w in caught if not _is_noise(w)]
    if options["engine"] != "auto" and learner.engine != options["engine"]:
        notes.append(f"asked for engine {options['engine']!r}, got {learner.engine!r}")
    def tuned() -> bool:
        return not learner.engine_decision.tuning

    return Impl(key, step, list(learner.parameters()), engine=learner.engine, notes=notes,
                tuned=tuned)


def _is_noise(w: warnings.WarningMessage) -> bool:
    """Deprecations from torch internals (e.g. under torch.compile) and anything from higher."""
    path = Path(w.filename).resolve()
    if path == Path(__file__).resolve() or _FASTMETA_DIR in path.parents:
        return False
    return issubclass(w.category, _NOISE) or "higher" in path.parts


def _describe(w: warnings.WarningMessage) -> str:
    return f"{w.category.__name__}: {w.message}"


def first_step(impl: Impl, task: Any) -> tuple[float, Tensor]:
    """Run ``impl``'s first meta-step, recording fastmeta's warnings in ``impl.notes``.

    Returns:
        The wall time of the call in seconds and the flattened meta-gradient it produced.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        impl.step(task)
        seconds = time.perf_counter() - start
    impl.notes += [_describe(w) for w in caught if not _is_noise(w)]
    impl.notes[:] = list(dict.fromkeys(impl.notes))  # each distinct warning once
    grads = [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in impl.parameters
    ]
    return seconds, torch.cat([g.reshape(-1) for g in grads])


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``‖value − reference‖₂ / ‖reference‖₂`` (in float64)."""
    value, reference = value.double(), reference.double()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------- throughput


def run_case(
    case: tuple[int, bool], keys: Sequence[str], repeats: int, warmup: int
) -> dict[str, Any]:
    """Check and time every implementation in ``keys`` on one case.

    Returns:
        ``{"rows": {key: {...}}, "unavailable": {key: reason}}`` where each row holds
        ``median_ms``, ``samples_ms``, ``vs_higher_loop``, ``vs_torchfunc_vmap``,
        ``grad_rel_error``, ``grad_ok``, ``first_call_s``, ``engine`` and ``notes``.
    """
    steps, first_order = case
    impls: dict[str, Impl] = {}
    unavailable: dict[str, str] = {}
    for key in keys:
        try:
            impls[key] = build(key, steps, first_order)
        except Unavailable as reason:
            unavailable[key] = str(reason)

    check_batch = sine_batch(seed=0)
    first_call: dict[str, float] = {}
    grads: dict[str, Tensor] = {}
    for key, impl in impls.items():
        first_call[key], grads[key] = first_step(impl, check_batch)
    reference = grads["torchfunc-vmap"]

    for i in range(warmup):
        batch = sine_batch(seed=1 + i)
        for impl in impls.values():
            impl.step(batch)
    for i in range(MAX_TUNING_STEPS):  # auto: until its tuner has chosen
        batch = sine_batch(seed=1 + warmup + i)
        untuned = [impl for impl in impls.values() if not impl.tuned()]
        if not untuned:
            break
        for impl in untuned:
            impl.step(batch)

    order = list(impls)
    samples: dict[str, list[float]] = {key: [] for key in order}
    for r in range(repeats):
        batch = sine_batch(seed=1000 + r)
        # a fresh order each round: a row run right after a long one (the higher loop)
        # is measurably slower, and a rotation would give every row the same predecessor
        for key in random.Random(r).sample(order, len(order)):
            start = time.perf_counter()
            impls[key].step(batch)
            samples[key].append((time.perf_counter() - start) * 1e3)

    rows: dict[str, dict[str, Any]] = {}
    for key, impl in impls.items():
        error = relative_error(grads[key], reference)
        rows[key] = {
            "median_ms": statistics.median(samples[key]),
            "samples_ms": samples[key],
            "vs_higher_loop": _paired_ratio(samples["higher-loop"], samples[key]),
            "vs_torchfunc_vmap": _paired_ratio(samples["torchfunc-vmap"], samples[key]),
            "grad_rel_error": error,
            "grad_ok": error <= GRAD_TOLERANCE,
            "first_call_s": first_call[key],
            "engine": impl.engine,
            "notes": impl.notes,
        }
    return {"rows": rows, "unavailable": unavailable}


def _paired_ratio(reference_ms: list[float], ms: list[float]) -> float:
    """Median over rounds of ``reference / ms`` (> 1: faster than the reference)."""
    return statistics.median(r / m for r, m in zip(reference_ms, ms))


# ---------------------------------------------------------------------------- memory


def memory_child(key: str) -> dict[str, Any]:
    """Peak memory of one second-order meta-step (run in a fresh process).

    Returns:
        ``peak_mib`` (high-water mark minus baseline), ``baseline_mib``, ``engine``, and
        ``bound_only`` (true where the high-water mark could not be reset, see below).
    """
    impl = build(key, MEMORY_STEPS, first_order=False)
    impl.step(sine_batch(seed=1, tasks=2))  # lazy initialisation, not counted
    batch = sine_batch(seed=2, tasks=MEMORY_META_BATCH)
    gc.collect()
    try:
        # Linux >= 4.0: writing 5 resets this process's VmHWM to its current VmRSS.
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        # No /proc (or no reset): ru_maxrss is a high-water mark that cannot be reset and,
        # on Linux, is even inherited from the parent across fork + exec; only if the step
        # raises it above its level before the step is the difference a measurement.
        scale = 1024 if sys.platform == "darwin" else 1  # bytes on macOS, KiB on Linux
        before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        impl.step(batch)
        after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale
        return {
            "peak_mib": (after_kib - before_kib) / 1024,
            "baseline_mib": before_kib / 1024,
            "bound_only": True,
            "method": "ru_maxrss",
            "engine": impl.engine,
        }
    baseline_kib = _proc_status_kib("VmRSS")
    impl.step(batch)
    peak_kib = _proc_status_kib("VmHWM")
    return {
        "peak_mib": (peak_kib - baseline_kib) / 1024,
        "baseline_mib": baseline_kib / 1024,
        "bound_only": False,
        "method": "VmHWM",
        "engine": impl.engine,
    }


def _proc_status_kib(name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name} field")


def run_memory(threads: int, runs: int) -> dict[str, dict[str, Any]]:
    """Run :func:`memory_child` ``runs`` times for every key of ``MEMORY_IMPLS``.

    Each run is a fresh process; the processes of different implementations alternate.

    Returns:
        Per key: ``peak_mib`` (median over runs), ``runs`` (every child's result),
        ``bound_only`` (true if any run was only a bound), ``engine``, ``vs_torchfunc_vmap``.

    Raises:
        RuntimeError: a child failed (its stderr is in the message).
    """
    children: dict[str, list[dict[str, Any]]] = {key: [] for key in MEMORY_IMPLS}
    for _ in range(runs):
        for key in MEMORY_IMPLS:
            command = [sys.executable, str(Path(__file__).resolve())]
            command += ["--memory-child", key, "--threads", str(threads)]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                raise RuntimeError(
                    f"memory measurement of {key} failed (exit {child.returncode}):\n{child.stderr}"
                )
            children[key].append(json.loads(child.stdout.strip().splitlines()[-1]))
    results = {
        key: {
            "peak_mib": statistics.median(run["peak_mib"] for run in runs_),
            "bound_only": any(run["bound_only"] for run in runs_),
            "engine": runs_[0]["engine"],
            "runs": runs_,
        }
        for key, runs_ in children.items()
    }
    reference = results["torchfunc-vmap"]["peak_mib"]
    for row in results.values():
        row["vs_torchfunc_vmap"] = row["peak_mib"] / reference
    return results


# ---------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One speed target and how it fared.

    Attributes:
        name: what is required.
        status: ``"PASS"``, ``"MISS"`` or ``"SKIP"`` (not measured on purpose).
        detail: the measured value, or why it is missing.
    """

    name: str
    status: str
    detail: str


def check_targets(
    throughput: dict[str, Any], memory: dict[str, Any] | None, compile_skipped: str | None
) -> list[Target]:
    """Check the speed targets on the second-order, 1-step case."""
    case = throughput.get(case_key(TARGET_CASE))
    rows = case["rows"] if case else {}
    unavailable = case["unavailable"] if case else {}

    def ratio_target(name: str, key: str, column: str, minimum: float) -> Target:
        if key not in rows:
            if compile_skipped and key == "fastmeta-vmap-compile":
                return Target(name, "SKIP", f"not measured: {compile_skipped}")
            reason = unavailable.get(key, "not measured")
            return Target(name, "MISS", f"unavailable: {reason}")
        row = rows[key]
        value = row[column]
        detail = f"{value:.2f}x (need >= {minimum:g}x)"
        if row["notes"]:
            detail += f"; fastmeta warned: {row['notes'][0]}"
        if not row["grad_ok"]:
            return Target(name, "MISS", f"{detail}, but its meta-gradient is wrong")
        return Target(name, "PASS" if value >= minimum else "MISS", detail)

    targets = [
        ratio_target(
            "default engine >= 10x the higher loop", "fastmeta-auto", "vs_higher_loop", 10
        ),
        ratio_target(
            "default engine >= 0.9x the torch.func vmap loop",
            "fastmeta-auto",
            "vs_torchfunc_vmap",
            0.9,
        ),
        ratio_target(
            "compile=True >= 25x the higher loop", "fastmeta-vmap-compile", "vs_higher_loop", 25
        ),
        ratio_target(
            "higher engine >= 0.9x the higher loop", "fastmeta-higher", "vs_higher_loop", 0.9
        ),
    ]
    name = "default engine peak memory <= 1.2x the torch.func vmap loop"
    if memory is None:
        targets.append(Target(name, "SKIP", "not measured: --no-memory"))
    else:
        ratio = memory["fastmeta-auto"]["vs_torchfunc_vmap"]
        targets.append(
            Target(name, "PASS" if ratio <= 1.2 else "MISS", f"{ratio:.2f}x (need <= 1.2x)")
        )
    return targets


# ---------------------------------------------------------------------------- report


def format_report(
    throughput: dict[str, Any],
    memory: dict[str, Any] | None,
    targets: list[Target],
    settings: dict[str, Any],
) -> str:
    """The markdown report: timing table, correctness, compile times, memory, targets."""
    cases = [c for c in CASES if case_key(c) in throughput]
    lines = [
        f"## Throughput: sine MAML, ms per meta-iteration (median of {settings['repeats']}), "
        f"{settings['threads']} thread(s), torch {torch.__version__}, "
        f"fastmeta {fastmeta.__version__}",
        "",
        "Cells: ms · speed relative to the higher loop · relative to the torch.func vmap "
        "loop (medians of per-round ratios; > 1 is faster).",
        "",
        "| implementation | engine | " + " | ".join(case_name(c) for c in cases) + " |",
        "|---|---|" + "---|" * len(cases),
    ]
    for key, label in LABELS.items():
        cells = []
        engines = set()
        for case in cases:
            data = throughput[case_key(case)]
            if key in data["rows"]:
                row = data["rows"][key]
                engines.add(row["engine"] or "-")
                flag = "" if row["grad_ok"] else " WRONG GRADIENT"
                cells.append(
                    f"{row['median_ms']:.1f} · {row['vs_higher_loop']:.1f}× · "
                    f"{row['vs_torchfunc_vmap']:.2f}×{flag}"
                )
            elif key in data["unavailable"]:
                cells.append("unavailable")
            else:
                cells.append("not run")
        engine = "/".join(sorted(engines)) if engines else "-"
        lines.append(f"| {label} | {engine} | " + " | ".join(cells) + " |")

    reasons = {
        (key, reason)
        for case in cases
        for key, reason in throughput[case_key(case)]["unavailable"].items()
    }
    for key, reason in sorted(reasons):
        lines.append(f"- {LABELS[key]}: unavailable: {reason}")
    if settings["compile_note"]:
        lines.append(f"- {LABELS['fastmeta-vmap-compile']}: {settings['compile_note']}")

    lines += ["", "## Correctness: meta-gradient vs the torch.func vmap loop (relative L2 error)"]
    lines += ["", "| implementation | " + " | ".join(case_name(c) for c in cases) + " |"]
    lines += ["|---|" + "---|" * len(cases)]
    for key, label in LABELS.items():
        cells = []
        for case in cases:
            row = throughput[case_key(case)]["rows"].get(key)
            if row is None:
                cells.append("-")
            else:
                ok = "ok" if row["grad_ok"] else f"FAIL (> {GRAD_TOLERANCE:g})"
                cells.append(f"{row['grad_rel_error']:.1e} {ok}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    all_ok = all(
        row["grad_ok"] for case in cases for row in throughput[case_key(case)]["rows"].values()
    )
    lines.append("")
    lines.append(
        "All meta-gradients agree." if all_ok else "SOME META-GRADIENTS DISAGREE: see FAIL above."
    )

    compiled = [
        (case, throughput[case_key(case)]["rows"]["fastmeta-vmap-compile"])
        for case in cases
        if "fastmeta-vmap-compile" in throughput[case_key(case)]["rows"]
    ]
    if compiled:
        lines += ["", "## Compile warm-up (first meta-step of the compiled learner)", ""]
        for case, row in compiled:
            lines.append(f"- {case_name(case)}: {row['first_call_s']:.1f} s")
        lines.append(
            "- The first one also pays torch.compile's one-time start-up in this process; "
            "inductor's on-disk cache (e.g. /tmp/torchinductor_$USER) shortens later runs."
        )

    notes = [
        (case, key, note)
        for case in cases
        for key, row in throughput[case_key(case)]["rows"].items()
        for note in row["notes"]
    ]
    if notes:
        lines += ["", "## Warnings raised by fastmeta", ""]
        for case, key, note in notes:
            lines.append(f"- {LABELS[key]}, {case_name(case)}: {note}")

    if memory is not None:
        lines += [
            "",
            f"## Peak memory: {MEMORY_STEPS} inner steps, meta-batch {MEMORY_META_BATCH}, "
            f"second order (median of {settings['memory_runs']} fresh process(es) each)",
            "",
            "| implementation | engine | peak MiB above baseline | vs torch.func vmap loop |",
            "|---|---|---|---|",
        ]
        for key, row in memory.items():
            bound = " (bound only)" if row["bound_only"] else ""
            lines.append(
                f"| {LABELS[key]} | {row['engine'] or '-'} | {row['peak_mib']:.1f}{bound} | "
                f"{row['vs_torchfunc_vmap']:.2f}× |"
            )

    lines += ["", f"## Targets ({case_name(TARGET_CASE)}, {settings['threads']} thread(s))", ""]
    for target in targets:
        lines.append(f"- {target.status}: {target.name}: {target.detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Throughput of sine MAML: fastmeta's engines against hand-written loops."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="7 repeats, 1 warm-up step, no compile, 1 memory run (< 1 minute)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed rounds per case (default 30, --quick 7)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed meta-steps per implementation after the check (default 3, --quick 1)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip fastmeta compile=True")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write every number (samples included) to PATH",
    )
    parser.add_argument(
        "--memory-child", choices=MEMORY_IMPLS, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 7 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the markdown report, and return every number.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        ``{"settings", "throughput", "memory", "targets", "report"}``; ``throughput`` is
        keyed by case (``"steps1-second"``, ...), see :func:`run_case`.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        result = memory_child(args.memory_child)
        print(json.dumps(result))
        return result

    compile_note = None
    if args.no_compile:
        compile_note = "skipped (--no-compile)"
    elif args.quick:
        compile_note = "skipped (--quick: compiling takes ~40 s per case here)"
    skip_compile = args.no_compile or args.quick
    throughput: dict[str, Any] = {}
    for case in CASES:
        keys = [key for key in LABELS if not (skip_compile and key == "fastmeta-vmap-compile")]
        throughput[case_key(case)] = run_case(case, keys, args.repeats, args.warmup)
    memory_runs = 1 if args.quick else 3
    memory = None if args.no_memory else run_memory(args.threads, memory_runs)
    compile_skipped = ("--no-compile" if args.no_compile else "--quick") if skip_compile else None
    targets = check_targets(throughput, memory, compile_skipped)
    settings = {
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": args.threads,
        "quick": args.quick,
        "compile_note": compile_note,
        "memory_runs": memory_runs,
        "torch": torch.__version__,
        "fastmeta": fastmeta.__version__,
        "config": {
            "model": "SineMLP 1-40-40-1 ReLU",
            "meta_batch": META_BATCH,
            "support": SHOTS,
            "query": QUERY,
            "inner_lr": INNER_LR,
            "outer": f"Adam(lr={OUTER_LR})",
            "memory": {"inner_steps": MEMORY_STEPS, "meta_batch": MEMORY_META_BATCH},
        },
    }
    report = format_report(throughput, memory, targets, settings)
    print(report)
    result = {
        "settings": settings,
        "throughput": throughput,
        "memory": memory,
        "targets": [asdict(t) for t in targets],
        "report": report,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
