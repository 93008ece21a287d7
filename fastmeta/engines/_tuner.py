"""Choosing between exact engines by measuring them on the learner's own meta-steps.

For each batch shape (the shapes of a task's tensors, without the task dimension), the
first meta-gradient runs on the first candidate untimed (a warm-up), the next
``rounds × len(candidates)`` run on each candidate in turn and are timed, and from then on
the candidate with the smallest best time runs. Every candidate is exact, so the tuning
meta-steps are ordinary meta-steps: tuning costs no extra computation, only the time of the
slower candidates during those steps.

A candidate that runs the same computation as an earlier one on the batch (``vmap`` in
chunks of 4 tasks, on 4 tasks or fewer, is ``vmap``) is not run for its turn: the fastest
candidate measured so far runs instead, and the twin's time counts as its own. So the
number of tuning steps never depends on the batch (every process of a data-parallel job
decides at the same meta-step), and a meta-batch of 4 spends no step on a slow twin.

A candidate that raises while it is tried is left out from then on (its error kept in
:attr:`Tuner.failures`) and the meta-step runs on the next candidate; only if every
candidate fails was the error the input's, and the first one is raised.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from .._task import TaskBatch
from .._tree import leaves
from ._base import Engine

Key = tuple[Any, ...]


def shape_key(task: TaskBatch) -> Key:
    """The shapes of one task's tensors (the task dimension left out)."""
    return tuple(None if part is None else tuple((tuple(t.shape[1:]), str(t.dtype))
                                                 for t in leaves(part)) for part in task)


class Tuner:
    """Times ``candidates`` on real meta-steps and keeps the fastest, per batch shape.

    Args:
        candidates: ``(label, engine)`` pairs, every one exact for the model.
        rounds: timed meta-steps per candidate (the best of them counts).
        clock: the timer (``time.perf_counter``; tests pass a fake one).
    """

    def __init__(self, candidates: Sequence[tuple[str, Engine]], *, rounds: int = 2,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.candidates = list(candidates)
        self._engines = dict(self.candidates)  # by label, built once: run() is per step
        self.rounds = rounds
        self.clock = clock
        self._calls: dict[Key, int] = {}
        self._times: dict[Key, dict[str, list[float]]] = {}
        self._twins: dict[Key, dict[str, str]] = {}  # label -> the candidate it equals
        self.chosen: dict[Key, str] = {}
        self.timings: dict[Key, dict[str, float]] = {}
        self.failures: dict[str, str] = {}  # label -> the error that ruled it out

    @property
    def steps(self) -> int:
        """Meta-steps per batch shape before the choice: one warm-up, then the timed ones."""
        return 1 + self.rounds * len(self.candidates)

    def run(self, key: Key, call: Callable[[Engine], Any],
            twin: Callable[[str], str | None] | None = None,
            undo: Callable[[], None] | None = None) -> tuple[str, Any]:
        """Run ``call(engine)`` on the engine for ``key`` (timing it while tuning).

        Args:
            key: the batch shape (:func:`shape_key`).
            call: runs one meta-step on the engine it is given.
            twin: for a label, the label of an earlier candidate that runs the same
                computation on this batch, or ``None``.
            undo: clears what a failed ``call`` may have left (a partial ``.grad``)
                before the next candidate runs.
        """
        engines = self._engines
        if key in self.chosen:
            label = self.chosen[key]
            return label, call(engines[label])
        position = self._calls.get(key, 0)
        if position == 0 or position >= self.steps:  # warm-up, or waiting for decide()
            self._calls[key] = max(position, 1)
            return self._run_first(call, self._working()[0], undo)
        self._calls[key] = position + 1
        label = self.candidates[(position - 1) % len(self.candidates)][0]
        times = self._times.setdefault(key, {})
        same = twin(label) if twin is not None else None
        if same is not None:
            self._twins.setdefault(key, {})[label] = same
        if same is not None or label in self.failures:  # run the fastest measured instead
            measured = {k: min(v) for k, v in times.items() if v and k not in self.failures}
            label = min(measured, key=measured.__getitem__) if measured else (
                same if same is not None and same not in self.failures else self._working()[0])
        start = self.clock()
        label, result = self._run_first(call, label, undo)
        times.setdefault(label, []).append(self.clock() - start)
        return label, result

    def _working(self) -> list[str]:
        """The labels of the candidates that have not failed, in order (at least one)."""
        labels = [label for label, _ in self.candidates if label not in self.failures]
        return labels or [self.candidates[0][0]]

    def _run_first(self, call: Callable[[Engine], Any], label: str,
                   undo: Callable[[], None] | None) -> tuple[str, Any]:
        """``call`` on ``label``'s engine, or on the next working candidate if it fails."""
        engines, tried, errors = dict(self.candidates), [], []
        order = [label] + [other for other in self._working() if other != label]
        for current in order:
            try:
                return current, call(engines[current])
            except Exception as error:  # noqa: PERF203 - one try per candidate
                if undo is not None:
                    undo()
                tried.append(current)
                errors.append(error)
                text = str(error).strip()
                self.failures[current] = (
                    f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300])
        for current in tried:  # every candidate failed: the input's error, not theirs
            del self.failures[current]
        raise errors[0]

    def ready(self) -> list[Key]:
        """Batch shapes measured but not decided yet."""
        return [k for k, n in self._calls.items() if n >= self.steps and k not in self.chosen]

    def decide(self, agree: Callable[[list[float]], list[float]] | None = None) -> None:
        """Choose the fastest candidate for every measured batch shape.

        Args:
            agree: combines the times with the other processes of a data-parallel job
                (e.g. their sum), so that every process makes the same choice.
        """
        for key in self.ready():
            times, twins = self._times[key], self._twins.get(key, {})
            best = [min(times.get(twins.get(label, label)) or [float("inf")])
                    if label not in self.failures else float("inf")
                    for label, _ in self.candidates]
            combined = agree(best) if agree is not None else best
            labels = [label for label, _ in self.candidates]
            self.chosen[key] = labels[min(range(len(labels)), key=combined.__getitem__)]
            self.timings[key] = {label: t for label, t in zip(labels, combined)
                                 if t != float("inf")}  # a candidate that failed has none
