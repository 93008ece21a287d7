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

After that the engine never changes: a later error is the input's, and it is raised.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
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
    """

    engine: str
    reason: str
    checked: tuple[str, ...] = ()
    max_error: float | None = None
    check_seconds: float = 0.0
    timings: dict[str, float] | None = None
    tuning: bool = False


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
                 clock: Callable[[], float] = time.perf_counter) -> None:
        obstacle = vmap_obstacle(model, optimizer)
        self._fallbacks = per_task_engines(optimizer)
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
            return dict(tuner.candidates)[tuner.chosen[key]].name
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
        return EngineDecision(self.name, reason, tuple(self._checked), self._max_error,
                              self._seconds, timings, self._tuning())

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
        return self._call("adapt", module, task, loop, order=order)

    def meta_loss(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                  outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        return self._call("meta_loss", module, task, loop, outer, order=order)

    def meta_gradient(self, module: nn.Module, task: TaskBatch, loop: InnerLoop,
                      outer: OuterObjective, *, order: MetaGrad) -> MetaLosses:
        if self._settled and self._current is self._vmap and self._tuner is None:
            self._start_tuning([("vmap", self._vmap), ("loop", LoopEngine()),
                                ("vmap, chunks of 4", VmapEngine(chunk_size=4))])
        tuner = self._tuner
        if tuner is None or not self._settled or not (self.tune or tuner.chosen):
            return self._call("meta_gradient", module, task, loop, outer, order=order)
        self._latest_key = shape_key(task)

        def twin(label: str) -> str | None:  # one chunk holding every task is plain vmap
            engine = dict(tuner.candidates)[label]
            if isinstance(engine, VmapEngine) and engine.chunk_size and not engine.splits(task):
                return "vmap"
            return None

        def undo() -> None:  # a backward pass that broke off may have written .grad
            for tensor in module.parameters():
                tensor.grad = None

        _, losses = tuner.run(self._latest_key, lambda engine: engine.meta_gradient(
            module, task, loop, outer, order=order), twin, undo)
        return losses

    def _call(self, verb: str, module: nn.Module, task: TaskBatch, loop: InnerLoop, *args: Any,
              **kwargs: Any) -> Any:
        def attempt(engine: Engine) -> Any:
            return getattr(engine, verb)(module, task, loop, *args, **kwargs)

        if self._settled:
            return attempt(self._current)
        try:
            output = attempt(self._current)
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
