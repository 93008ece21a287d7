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

    @property
    def steps(self) -> int:
        """Meta-steps per batch shape before the choice: one warm-up, then the timed ones."""
        return 1 + self.rounds * len(self.candidates)

    def run(self, key: Key, call: Callable[[Engine], Any],
            twin: Callable[[str], str | None] | None = None) -> tuple[str, Any]:
        """Run ``call(engine)`` on the engine for ``key`` (timing it while tuning).

        Args:
            key: the batch shape (:func:`shape_key`).
            call: runs one meta-step on the engine it is given.
            twin: for a label, the label of an earlier candidate that runs the same
                computation on this batch, or ``None``.
        """
        engines = self._engines
        if key in self.chosen:
            label = self.chosen[key]
            return label, call(engines[label])
        position = self._calls.get(key, 0)
        if position >= self.steps:  # measured, waiting for decide()
            label = self.candidates[0][0]
            return label, call(engines[label])
        self._calls[key] = position + 1
        if position == 0:
            label = self.candidates[0][0]
            return label, call(engines[label])
        label = self.candidates[(position - 1) % len(self.candidates)][0]
        times = self._times.setdefault(key, {})
        same = twin(label) if twin is not None else None
        if same is not None:
            self._twins.setdefault(key, {})[label] = same
            measured = {k: min(v) for k, v in times.items() if v}
            label = min(measured, key=measured.__getitem__) if measured else same
        start = self.clock()
        result = call(engines[label])
        times.setdefault(label, []).append(self.clock() - start)
        return label, result

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
            best = [min(times[twins.get(label, label)]) for label, _ in self.candidates]
            combined = agree(best) if agree is not None else best
            self.timings[key] = {label: t for (label, _), t in zip(self.candidates, combined)}
            self.chosen[key] = min(self.timings[key], key=self.timings[key].__getitem__)
