"""``engine="auto"``: the vectorised engine where it is exact for the model, otherwise the
fastest per-task exact engine (``higher`` or ``loop``) that runs it.

The choice is made once per kind of call, before the first one runs:

1. Static obstacles (an inner optimiser without a functional rule, a recurrent layer
   ``vmap`` cannot batch) rule out the vectorised engine at construction, with a warning.
2. Before the first ``adapt`` and the first meta-gradient, a *probe* runs the learner's
   computation on a float64 copy of itself, on the first two tasks of the batch, with the
   vectorised engine and a per-task reference (higher, or ``loop`` where higher cannot run
   the model), and compares the results (adapted weights, or the meta-gradient written
   into ``.grad``). The vectorised engine is kept only if they agree; a failure of the
   vectorised engine where the reference succeeds (torch.func's refusals: a missing
   batching rule, ``.item()`` or data-dependent control flow under ``vmap``, an in-place
   write into a captured tensor, ...) rules it out as well. Either way one warning says
   why. The probe never changes the learner, its model or the random-number state.
3. Without the probe (``verify_engine=False``), the first call that torch.func refuses
   (recognised by :func:`is_torch_func_refusal`) is retried with higher, then ``loop``;
   if every retry fails, the error was the input's: it is raised and the engine stays.

Where the vectorised engine is ruled out, the per-task engines that run the model (higher
and ``loop``; ``loop`` needs an inner optimiser with a functional rule) are timed on the
next meta-steps (:class:`~fastmeta.engines.Tuner`) and the fastest is kept; one that fails
is left out and the meta-step runs on the next, so the user never sees its error.

Where the vectorised engine runs, its candidates (the per-task loop, ``vmap`` in chunks,
``vmap``) are kept within the memory budget (:mod:`fastmeta.engines._memory`): the first
meta-step of each batch shape runs on the loop, and a candidate predicted over the budget
never runs. Both paths share one rule for a candidate that raises while it runs: the tuner
undoes the partial ``.grad``, sets the candidate aside (out of memory: for that batch
shape; any other error: for good) and runs the same meta-step on the next one.

After that the engine never changes: a later error is the input's, and it is raised.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._inner_optim import FUNCTIONAL_OPTIMIZERS, InnerOptimizer
from .._task import TaskBatch
from .._tree import first_leaf, tree_map
from ._base import Adaptation, Engine, InnerLoop, MetaGrad, MetaLosses, OuterObjective
from ._exact import unvectorisable_layer
from ._higher import HigherEngine
from ._loop import LoopEngine
from ._memory import (
    GradSnapshot,
    MemoryRecord,
    adapt_footprint,
    adapt_in_chunks,
    is_out_of_memory,
    largest_fitting_chunk,
    memory_in_use,
    predicted_peak,
    release_memory,
    resolve_budget,
    run_within_memory,
    task_footprint,
)
from ._tuner import Key, Tuner, shape_key
from ._vmap import VmapEngine

# Probe(engine, dtype, small): the learner's computation on a copy of itself, run by
# ``engine`` in ``dtype`` (None: the model's own), on a smaller problem if ``small`` (see
# smaller_probe); returns named tensors to compare.
Probe = Callable[[Engine, "torch.dtype | None", bool], dict[str, Tensor]]
# Agree(verdict) -> the verdict every process of a data-parallel job takes (the worst).
Agree = Callable[[int], int]

AGREE, INCONCLUSIVE, DISAGREE = 0, 1, 2

# Substrings of the errors torch.func raises where it cannot run a model (torch 2.x).
TORCH_FUNC_REFUSALS = (
    "vmap:",
    "batching rule",
    "batched tensor",
    "randomness",
    "data-dependent control flow",
    ".item()",
    "captured tensor",
    "during a grad",
    "functorch",
    "torch.func",
    "doesn't match the broadcast shape",  # an in-place write into an unbatched tensor
)


def is_torch_func_refusal(error: BaseException) -> bool:
    """Whether ``error`` is torch.func refusing a model (never an out-of-memory error)."""
    if isinstance(error, torch.OutOfMemoryError) or not isinstance(error, RuntimeError):
        return False
    message = str(error).lower()
    return any(marker in message for marker in TORCH_FUNC_REFUSALS)


# Inner steps of the small probe: the first step differentiates through the shared
# initial weights, the second through weights already specific to each task; later steps
# repeat the second's computation, so they exercise no other batching rule.
PROBE_STEPS = 2


def smaller_probe(task: TaskBatch) -> TaskBatch:
    """``task`` with its query set cut to as many examples as the support set (at least 2).

    The check compares two engines on the same computation, so it needs every layer and
    every kind of inner step, not every example: on the miniImageNet shape (5 support, 75
    query images) the query set is most of the cost, and in float64 (where a CPU has no
    fast convolution) the cost is seconds. Leaves whose dim 1 is not the query's example
    count (per-task context) are kept whole.
    """
    keep = max(task.support_shots, 2)
    shots = int(first_leaf(task.query_x).shape[1])
    if shots <= keep:
        return task

    def cut(leaf: Tensor) -> Tensor:
        return leaf[:, :keep] if leaf.dim() >= 2 and leaf.shape[1] == shots else leaf

    return task._replace(query_x=tree_map(cut, task.query_x),
                         query_y=tree_map(cut, task.query_y))


def per_task_engines(optimizer: InnerOptimizer) -> list[tuple[str, Engine]]:
    """The exact engines that run one task at a time, in the order ``auto`` tries them:
    higher, and ``loop`` where the inner optimiser has a functional rule."""
    engines: list[tuple[str, Engine]] = [("higher", HigherEngine())]
    if optimizer.functional:
        engines.append(("loop", LoopEngine()))
    return engines


def vmap_obstacle(model: nn.Module, optimizer: InnerOptimizer) -> str | None:
    """Why the vectorised engine cannot run this configuration, or ``None``."""
    if not optimizer.functional:
        names = ", ".join(repr(name) for name in FUNCTIONAL_OPTIMIZERS)
        return (
            f"inner_optimizer={optimizer.name!r} has no functional rule in fastmeta "
            f"(the vectorised engine supports {names})"
        )
    return unvectorisable_layer(model)


@dataclass(frozen=True)
class EngineDecision:
    """How ``engine="auto"`` chose, as ``learner.engine_decision`` reports it.

    Attributes:
        engine: the engine that runs (``"vmap"``, ``"loop"`` or ``"higher"``).
        reason: why, in words (with the errors of the engines that were ruled out).
        checked: the kinds of call whose results were compared between the engines
            (``"adapt"``, ``"meta_gradient"``).
        max_error: worst relative difference between the engines in those checks
            (``None`` before any check).
        check_seconds: time spent checking, in total.
        timings: best seconds per meta-step of each exact candidate on the latest batch
            shape the tuner measured (``None`` before it has), e.g.
            ``{"vmap": 0.9, "loop": 0.5, "vmap, chunks of 4": 0.7}`` (on 4 tasks or
            fewer, chunks of 4 are plain ``vmap`` and get its time).
        tuning: whether the next meta-steps still time candidates (for the latest batch
            shape, or for the first one): the engine may change once they are done.
        memory_budget: bytes a meta-step may add to the memory in use (the resolved
            ``memory_budget``; ``None`` where the device does not say how much it has).
        task_footprint: bytes autograd saves for one task of the latest batch shape.
        predicted_peaks: bytes each candidate is predicted to add at its peak, by label
            (``"vmap"`` too where it is over the budget and never runs).
        measured_peaks: bytes each candidate added at its peak where that was seen (the
            process's high-water mark rose during its step), by label.
        out_of_memory: labels of the candidates that ran out of memory (each time); that
            meta-step was run again on a smaller candidate.
    """

    engine: str
    reason: str
    checked: tuple[str, ...] = ()
    max_error: float | None = None
    check_seconds: float = 0.0
    timings: dict[str, float] | None = None
    tuning: bool = False
    memory_budget: int | None = None
    task_footprint: int | None = None
    predicted_peaks: dict[str, int] | None = None
    measured_peaks: dict[str, int] | None = None
    out_of_memory: tuple[str, ...] = ()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def compare(reference: dict[str, Tensor], candidate: dict[str, Tensor]) -> tuple[float, str]:
    """Worst relative difference over the named tensors, and the name where it is.

    Each tensor is judged against its own largest value, or against a millionth of the
    largest value of all where it is zero up to rounding (a gradient that should be 0).
    """
    scale = max((float(t.abs().max()) for t in reference.values() if t.numel()), default=0.0)
    floor = max(1e-6 * scale, torch.finfo(torch.float64).tiny)
    worst, where = 0.0, ""
    for name, expected in reference.items():
        actual = candidate.get(name)
        if actual is None or actual.shape != expected.shape:
            return float("inf"), name
        if not expected.numel():
            continue
        error = float((actual - expected).abs().max()) / max(float(expected.abs().max()), floor)
        if not error <= worst:  # NaN counts as the worst
            worst, where = error, name
    return worst, where


def _tolerance(dtype: torch.dtype | None) -> float:
    if dtype is None or dtype == torch.float64:
        return 1e-7
    return 1e3 * torch.finfo(dtype).eps


class AutoEngine(Engine):
    """The vectorised engine where it is exact, higher otherwise (see the module docstring).

    Args:
        model: the wrapped model.
        optimizer: the inner optimiser.
        compile: ``torch.compile`` the vectorised engine.
        verify: compare the engines before the first call of each kind (the default);
            ``False`` trusts the vectorised engine wherever torch.func runs it.
    """

    def __init__(self, model: nn.Module, optimizer: InnerOptimizer, *, compile: bool,
                 verify: bool = True, tune: bool = True,
                 clock: Callable[[], float] = time.perf_counter,
                 memory_budget: int | None = None) -> None:
        obstacle = vmap_obstacle(model, optimizer)
        self._fallbacks = per_task_engines(optimizer)
        self.memory_budget = memory_budget  # bytes; None: a fraction of what is free
        self.memory: dict[Key, MemoryRecord] = {}
        # The tensors whose .grad a failed meta-step must restore (the learner's parameters).
        self.grads_of: Callable[[], Iterable[Tensor]] | None = None
        self._loop = LoopEngine()
        self._chunked: dict[int, VmapEngine] = {}
        self._untuned: dict[Key, str] = {}
        # batch shape -> (candidates within the budget, the labels over it)
        self._plans: dict[Key, tuple[list[tuple[str, Engine]], list[str]]] = {}
        # batch shape -> the candidate decided for it, called directly on later meta-steps
        # (no plan, no tuner, no peak reading); out of memory sends the shape back through
        # the full path, which moves on to a smaller candidate
        self._steady: dict[Key, Engine] = {}
        self._out_of_memory: list[str] = []  # outside a memory record (adapt, per-task)
        self._adapt_chunks: dict[Key, int | None] = {}
        self._baseline: int | None = None  # memory in use at the first call
        self._started = False
        self.verify = verify
        self.tune = tune and not compile  # compile=True asks for the vectorised engine
        self._clock = clock
        self._tuner: Tuner | None = None
        self._latest_key: Key | None = None
        self._probe_failures: dict[str, str] = {}
        self._reference = "higher"  # the per-task engine the latest check compared with
        self._vmap: VmapEngine | None = None if obstacle else VmapEngine(compile=compile)
        self._current: Engine = self._vmap or self._fallbacks[0][1]
        self._settled = obstacle is not None  # no more fallbacks once a call went through
        self._checked: list[str] = []
        self._max_error: float | None = None
        self._seconds = 0.0
        self._reason = (
            obstacle or "vectorised, until a first call checks it against higher"
        )
        if obstacle:
            self._fall_back(obstacle, {}, stacklevel=7)

    @property
    def name(self) -> str:  # type: ignore[override]
        tuner, key = self._tuner, self._latest_key
        if tuner is not None and key in tuner.chosen:
            return dict(tuner.candidates_for(key))[tuner.chosen[key]].name
        if key in self._untuned:
            return "loop" if self._untuned[key] == "loop" else "vmap"
        return self._current.name

    @property
    def decision(self) -> EngineDecision:
        """The current choice and how it was made."""
        tuner, key = self._tuner, self._latest_key
        timings = tuner.timings.get(key) if tuner is not None and key is not None else None
        reason = self._reason
        if tuner is not None:
            reason += "".join(f"; {label!r} fails on this model ({why})"
                              for label, why in tuner.failures.items())
        if timings:
            reason += f"; measured fastest: {tuner.chosen[key]}"  # type: ignore[union-attr,index]
        memory = self.memory.get(key) if key is not None else None
        failures = (*(memory.out_of_memory if memory else ()), *self._out_of_memory)
        if failures:
            reason += f"; out of memory once on: {', '.join(failures)}"
        return EngineDecision(
            self.name, reason, tuple(self._checked), self._max_error, self._seconds, timings,
            self._tuning(), memory_budget=memory.budget if memory else None,
            task_footprint=memory.footprint if memory else None,
            predicted_peaks=dict(memory.predicted) if memory else None,
            measured_peaks=dict(memory.measured) if memory else None, out_of_memory=failures)

    @property
    def tune(self) -> bool:
        """Whether the vectorised engine's candidates are timed per batch shape."""
        return self._tune

    @tune.setter
    def tune(self, enabled: bool) -> None:
        self._tune = bool(enabled)
        self._steady.clear()  # the next meta-step of each shape takes the full path again

    def _tuning(self) -> bool:
        if not self.tune:
            return False
        if self._tuner is None:  # it starts once a checked call settles on vmap
            return self._vmap is not None and self._current is self._vmap
        return self._latest_key is None or self._latest_key not in self._tuner.chosen

    def _start_tuning(self, candidates: list[tuple[str, Engine]]) -> None:
        if self.tune and self._tuner is None:
            self._tuner = Tuner(candidates, clock=self._clock)

    def tuning_ready(self) -> bool:
        """Whether measured batch shapes wait for :meth:`decide_tuning`."""
        return self._tuner is not None and bool(self._tuner.ready())

    def decide_tuning(self, agree: Callable[[list[float]], list[float]] | None = None) -> None:
        """Keep the fastest candidate for every measured batch shape (all ranks alike)."""
        if self._tuner is not None:
            self._tuner.decide(agree)

    def _warn(self, reason: str, timed: list[str], stacklevel: int) -> None:
        name = self._current.name
        then = (f"; it times {' and '.join(repr(label) for label in timed)} on the next "
                f"meta-steps and keeps the faster" if len(timed) > 1 else "")
        warnings.warn(
            f"engine='auto' uses the {name!r} engine: {reason}{then}. Pass engine={name!r} "
            f"to choose it explicitly and silence this warning.",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _fall_back(self, reason: str, failures: dict[str, str], *, stacklevel: int = 6) -> None:
        """Rule out the vectorised engine: run the per-task engines not in ``failures``
        (label -> error), timed against each other if there are several."""
        working = [(label, engine) for label, engine in self._fallbacks
                   if label not in failures] or self._fallbacks
        self._current, self._settled = working[0][1], True
        self._reason = reason + "".join(f"; {label!r} fails on this model too ({why})"
                                        for label, why in failures.items())
        if len(working) > 1:
            self._tuner = None
            self._start_tuning(working)
        self._warn(reason, [label for label, _ in working] if self.tune else [], stacklevel)

    def needs_check(self, kind: str) -> bool:
        """Whether :meth:`check` would run a probe for ``kind``."""
        return self.verify and self._current is self._vmap and kind not in self._checked

    def check(self, kind: str, probe: Probe, agree: Agree | None = None) -> None:
        """Compare the engines on ``probe`` before the first call of ``kind``.

        Args:
            kind: ``"adapt"`` or ``"meta_gradient"``.
            probe: runs the learner's computation on a copy with a given engine.
            agree: combines the verdict with the other processes of a data-parallel job.
        """
        if not self.needs_check(kind):
            return
        self._note_baseline()
        start = time.perf_counter()
        verdict, reason, failure = INCONCLUSIVE, "", None
        try:
            verdict, reason = self._probe_both(probe, kind)
        except torch.OutOfMemoryError as error:  # raised, but only after the peers know
            failure = error
        self._seconds += time.perf_counter() - start
        if agree is not None:
            verdict = max(verdict, agree(verdict))
            if verdict == DISAGREE and not reason:
                reason = "another process of the job found the engines disagree"
        if failure is not None:
            raise failure
        if verdict == DISAGREE:
            self._checked.append(kind)
            self._fall_back(reason, self._probe_failures)
        elif verdict == AGREE:
            self._checked.append(kind)
            self._reason = (f"vectorised; checked against {self._reference} "
                            f"({', '.join(self._checked)})")

    def _probe_both(self, probe: Probe, kind: str) -> tuple[int, str]:
        """``(verdict, reason)`` of one comparison: in float64 if the model runs in it, on
        the small problem if higher runs that (a model built for one query size may not)."""
        for dtype, small in ((torch.float64, True), (torch.float64, False), (None, True),
                             (None, False)):
            failures: dict[str, str] = {}
            for label, engine in self._fallbacks:  # the first per-task engine that runs it
                try:
                    reference = probe(engine, dtype, small)
                except torch.OutOfMemoryError:
                    raise
                except Exception as error:  # e.g. float32 constants: try the model's dtype
                    failures[label] = _first_line(error)
                    continue
                break
            else:
                continue
            self._probe_failures, self._reference = failures, label
            try:
                candidate = probe(VmapEngine(), dtype, small)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:
                return DISAGREE, (f"the vectorised engine fails on this model where {label} "
                                  f"runs it ({_first_line(error)})")
            if not all(torch.isfinite(t).all() for t in reference.values()):
                return INCONCLUSIVE, ""  # diverged: nothing to compare, the call will say so
            difference, where = compare(reference, candidate)
            self._max_error = difference
            if difference <= _tolerance(dtype):
                return AGREE, ""
            return DISAGREE, (
                f"its {'adapted weights differ' if kind == 'adapt' else 'meta-gradient differs'} "
                f"from a per-task computation on this model "
                f"(relative error {difference:.1e} on {where!r} against {label}; a batching "
                f"rule of torch.func is wrong for one of its layers)"
            )
        return INCONCLUSIVE, ""  # higher failed too: the input's error shows in the call

    def adapt(self, module: nn.Module, task: TaskBatch, loop: InnerLoop, *,
              order: MetaGrad = MetaGrad.NONE) -> Adaptation:
        vectorised = self._current is self._vmap
        size = self._adapt_chunk(module, task, loop, order) if vectorised else None
        try:
            if size is not None:  # every task at once would not fit the budget
                engine = self._current if size >= 1 else self._loop
                return adapt_in_chunks(engine, module, task, loop, order, max(size, 1))
            return self._call("adapt", module, task, loop, order=order)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not (vectorised and is_out_of_memory(error)):
                raise
        # Out of memory with every task at once: free it, then one task at a time.
        release_memory(_device_of(module))
        self._out_of_memory.append(f"adapt with vmap on {task.num_tasks} tasks")
        return self._loop.adapt(module, task, loop, order=order)

    def _adapt_chunk(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                     order: MetaGrad) -> int | None:
        """Tasks the vectorised ``adapt`` may take at once within the budget (0: none; the
        loop then runs), or ``None`` where every task fits (or nothing was measured)."""
        if task.num_tasks <= 1 or not (self._settled or "adapt" in self._checked):
            return None
        key = ("adapt", order, loop.steps, *shape_key(task))
        if key not in self._adapt_chunks:
            self._note_baseline()
            devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
            with torch.random.fork_rng(devices=devices):
                footprint = adapt_footprint(self._loop, module, task, loop, order)
            budget = resolve_budget(self.memory_budget, _device_of(module), self._baseline)
            fits = largest_fitting_chunk(task.num_tasks, footprint, _parameter_bytes(module),
                                         budget)
            self._adapt_chunks[key] = None if fits >= task.num_tasks else fits
        return self._adapt_chunks[key]

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        return self._call("meta_loss", module, task, loop, outer, order=order)

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        if self._vmap is not None and self._current is self._vmap:
            return self._vmap_meta_gradient(module, task, loop, outer, order=order)
        tuner = self._tuner
        if tuner is None or not self._settled or not (self.tune or tuner.chosen):
            return self._call("meta_gradient", module, task, loop, outer, order=order)
        self._latest_key = shape_key(task)
        def set_aside(label: str, error: Exception) -> None:
            if is_out_of_memory(error):
                self._out_of_memory.append(label)

        _, losses = tuner.run(self._latest_key, lambda engine: engine.meta_gradient(
            module, task, loop, outer, order=order), undo=self._undo(module),
            on_failure=set_aside)
        return losses

    def _vmap_meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                            outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        """The vectorised engine's meta-step within the memory budget (tuned if asked)."""
        key = self._latest_key = shape_key(task)
        steady = self._steady.get(key)
        if steady is not None:
            undo = self._undo(module)
            try:
                return steady.meta_gradient(module, task, loop, outer, order=order)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise  # decided: the error is the input's, as on the path below
                undo()
                del self._steady[key]  # the path below runs it again and moves on from it
        self._note_baseline()
        record = self._plan_memory(key, module, task, loop, outer, order)
        if key not in self._plans or not record.footprint:
            self._plans[key] = self._memory_candidates(task.num_tasks, record)
        candidates, excluded = self._plans[key]
        allowed = [c for c in candidates
                   if c[0] not in excluded and c[0] not in record.out_of_memory] or candidates[:1]
        # The tensors whose .grad a broken-off step must restore, walked once per step.
        tensors = self._grad_tensors(module)
        device = tensors[0].device if tensors else _device_of(module)

        def grads() -> list[Tensor]:
            return tensors

        def run(label: str, *, alone: bool = False) -> Any:
            """Runs candidate ``label``; out of memory, the next smaller one (``alone``:
            raises, for the tuner to set it aside)."""
            tuner = self._tuner
            measure = (label not in record.measured if tuner is None
                       else key not in tuner.chosen)
            within = [(label, dict(candidates)[label])] if alone else allowed
            return run_within_memory(
                record, within, label, lambda engine: engine.meta_gradient(
                    module, task, loop, outer, order=order),
                device=device, grads=grads, measure=measure)

        largest = allowed[-1]  # the vectorised candidate with the largest predicted peak
        if not self._settled and "meta_gradient" not in self._checked:
            # unchecked: this call finds out whether torch.func runs the model at all
            return run_within_memory(
                record, allowed, largest[0], lambda engine: self._call(
                    "meta_gradient", module, task, loop, outer, order=order, first=engine),
                device=device, grads=grads)[1]
        self._settled = True
        self._start_tuning([("loop", self._loop), ("vmap, chunks of 4", self._chunks(4)),
                            ("vmap", self._vmap)])  # type: ignore[list-item]
        tuner = self._tuner
        if tuner is None or not (self.tune or tuner.chosen):
            label, losses = run(largest[0])
            self._untuned[key] = label
            if label == largest[0]:  # it ran within the budget: so it runs from now on
                self._steady[key] = largest[1]
            return losses
        if tuner.candidates_for(key) is tuner.candidates and key not in tuner.chosen:
            tuner.plan(key, candidates, excluded)

        def twin(label: str) -> str | None:  # one chunk holding every task is plain vmap
            engine = dict(candidates)[label]
            if isinstance(engine, VmapEngine) and engine.chunk_size and not engine.splits(task):
                return "vmap"
            return None

        def call(engine: Engine) -> Any:  # the tuner moves to the next one if it raises
            label = next(name for name, e in candidates if e is engine)
            return run(label, alone=True)[1]

        def set_aside(label: str, error: Exception) -> None:
            if is_out_of_memory(error):
                record.out_of_memory.append(label)

        _, losses = tuner.run(key, call, twin, self._undo(module, tensors), set_aside)
        if key in tuner.chosen:  # decided: the chosen candidate runs from now on
            self._steady[key] = dict(candidates)[tuner.chosen[key]]
        return losses

    def _grad_tensors(self, module: nn.Module) -> list[Tensor]:
        """The tensors whose ``.grad`` a broken-off meta-step must restore."""
        return list((self.grads_of or module.parameters)())

    def _undo(self, module: nn.Module, tensors: list[Tensor] | None = None
              ) -> Callable[[], None]:
        """What undoes a meta-step that broke off: the ``.grad`` it may have written, and
        the memory it left (``tensors``: the learner's parameters, if already listed)."""
        if tensors is None:
            tensors = self._grad_tensors(module)
        snapshot = GradSnapshot(tensors)
        device = tensors[0].device if tensors else _device_of(module)

        def undo() -> None:
            snapshot.restore()
            release_memory(device)

        return undo

    def _note_baseline(self) -> None:
        """The memory in use before this engine first runs anything (once)."""
        if not self._started:
            self._started = True
            self._baseline = memory_in_use(self._device())

    def _device(self) -> torch.device:
        """Where the learner's parameters are now (``learner.to(...)`` may move them)."""
        first = next(iter(self.grads_of()), None) if self.grads_of is not None else None
        return torch.device("cpu") if first is None else first.device

    def _chunks(self, size: int) -> VmapEngine:
        if size not in self._chunked:
            self._chunked[size] = VmapEngine(chunk_size=size)
        return self._chunked[size]

    def _plan_memory(self, key: Key, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                     outer: OuterObjective, order: MetaGrad) -> MemoryRecord:
        """The footprint of one task of this batch shape, measured once, and the budget."""
        if key in self.memory:
            return self.memory[key]
        devices = sorted({p.device.index or 0 for p in module.parameters() if p.is_cuda})
        try:
            with torch.random.fork_rng(devices=devices):  # dropout draws nothing for real
                footprint = task_footprint(self._loop, module, task, loop, outer, order)
        except Exception as error:
            if is_out_of_memory(error):
                raise
            # The model fails on this batch: the call itself raises that error (with the
            # engine the user would see); there is nothing to plan.
            return MemoryRecord(None, 0, {})
        budget = resolve_budget(self.memory_budget, _device_of(module), self._baseline)
        weights = _parameter_bytes(module)
        record = self.memory[key] = MemoryRecord(budget, footprint, {}, weights)
        tasks = task.num_tasks
        for label, engine in (("loop", self._loop), *self._fallbacks[:1],
                              ("vmap", self._vmap or VmapEngine())):
            record.predicted[label] = predicted_peak(engine, tasks, footprint, weights)
        return record

    def _memory_candidates(self, tasks: int, record: MemoryRecord
                           ) -> tuple[list[tuple[str, Engine]], list[str]]:
        """``[loop, vmap in chunks of min(4, c), vmap (or in chunks of c)]`` with ``c`` the
        most tasks at once that fit the budget, and the labels predicted over it.

        Always three candidates, so that every batch shape (and every process of a
        data-parallel job) decides after the same number of meta-steps; the per-task loop,
        the smallest, is never excluded."""
        weights = record.parameter_bytes
        fits = (largest_fitting_chunk(tasks, record.footprint, weights, record.budget)
                if record.footprint else tasks)
        small = 4 if fits >= min(4, tasks) else max(fits, 1)
        assert self._vmap is not None
        big: tuple[str, Engine] = ("vmap", self._vmap)
        if fits < tasks and fits > 4:
            big = (f"vmap, chunks of {fits}", self._chunks(fits))
        candidates = [("loop", self._loop), (f"vmap, chunks of {small}", self._chunks(small)),
                      big]
        excluded = []
        for label, engine in candidates[1:]:
            peak = predicted_peak(engine, tasks, record.footprint, weights)
            record.predicted.setdefault(label, peak)
            if record.budget is not None and record.footprint and peak > record.budget:
                excluded.append(label)
        return candidates, excluded

    def _call(self, verb: str, module: nn.Module, task: TaskBatch, loop: InnerLoop, *args: Any,
              first: Engine | None = None, **kwargs: Any) -> Any:
        def attempt(engine: Engine) -> Any:
            return getattr(engine, verb)(module, task, loop, *args, **kwargs)

        if self._settled:
            return attempt(self._current)
        try:
            output = attempt(first or self._current)
        except RuntimeError as error:
            if not is_torch_func_refusal(error):
                raise
            failures: dict[str, str] = {}
            for label, engine in self._fallbacks:
                if verb == "meta_gradient":  # a backward that broke off may have written .grad
                    for tensor in module.parameters():
                        tensor.grad = None
                try:
                    output = attempt(engine)
                except Exception as fallback_error:
                    failures[label] = _first_line(fallback_error)
                    continue
                self._fall_back(f"torch.func refused this model ({_first_line(error)})",
                                failures)
                return output
            raise error from None  # the input's error: the engine stays
        self._settled = True
        return output


def _device_of(module: nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
