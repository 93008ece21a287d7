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

A batch shape may have candidates of its own (:meth:`Tuner.plan`: ``vmap`` in the largest
chunks that fit the memory budget), and candidates may be *excluded* for it (predicted
over the budget, or out of memory once): an excluded candidate's turns run the fastest one
measured so far, its time is not counted, and it is never chosen.

A candidate that raises while it runs is set aside and the same meta-step runs on the next
candidate: one that ran out of memory is excluded for that batch shape; any other error
rules it out for every shape (the error kept in :attr:`Tuner.failures`). Only if every
candidate fails was the error the input's, and the first one is raised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._task import TaskBatch
from .._tree import leaves
from ._base import Engine
from ._memory import is_out_of_memory

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
        self.rounds = rounds
        self.clock = clock
        self._calls: dict[Key, int] = {}
        self._times: dict[Key, dict[str, list[float]]] = {}
        self._twins: dict[Key, dict[str, str]] = {}  # label -> the candidate it equals
        self._plans: dict[Key, list[tuple[str, Engine]]] = {}
        self.excluded: dict[Key, set[str]] = {}
        self.chosen: dict[Key, str] = {}
        self.timings: dict[Key, dict[str, float]] = {}
        self.failures: dict[str, str] = {}  # label -> the error that ruled it out

    def candidates_for(self, key: Key) -> list[tuple[str, Engine]]:
        """The candidates of batch shape ``key`` (:meth:`plan`, else the tuner's own)."""
        return self._plans.get(key, self.candidates)

    def plan(self, key: Key, candidates: Sequence[tuple[str, Engine]],
             excluded: Sequence[str] = ()) -> None:
        """Candidates for batch shape ``key`` alone (as many as the tuner's own, so that
        every shape decides after :attr:`steps`), some of them excluded."""
        if len(candidates) != len(self.candidates):
            raise ValueError(f"a plan needs {len(self.candidates)} candidates, got "
                             f"{len(candidates)}")
        self._plans[key] = list(candidates)
        self.excluded[key] = set(excluded)

    def exclude(self, key: Key, label: str) -> None:
        """Never run or choose ``label`` again for ``key`` (it ran out of memory); a choice
        already made for it moves to the fastest candidate left."""
        self.excluded.setdefault(key, set()).add(label)
        if self.chosen.get(key) == label:
            left = {k: t for k, t in self.timings[key].items()
                    if k not in self.excluded[key]}
            if left:
                self.chosen[key] = min(left, key=left.__getitem__)
            else:
                del self.chosen[key]

    @property
    def steps(self) -> int:
        """Meta-steps per batch shape before the choice: one warm-up, then the timed ones."""
        return 1 + self.rounds * len(self.candidates)

    def run(self, key: Key, call: Callable[[Engine], Any],
            twin: Callable[[str], str | None] | None = None,
            undo: Callable[[], None] | None = None,
            on_failure: Callable[[str, Exception], None] | None = None) -> tuple[str, Any]:
        """Run ``call(engine)`` on the engine for ``key`` (timing it while tuning).

        Args:
            key: the batch shape (:func:`shape_key`).
            call: runs one meta-step on the engine it is given.
            twin: for a label, the label of an earlier candidate that runs the same
                computation on this batch, or ``None``.
            undo: clears what a failed ``call`` may have left (a partial ``.grad``, memory)
                before the next candidate runs.
            on_failure: told each ``(label, error)`` that was set aside.
        """
        candidates = self.candidates_for(key)
        if key in self.chosen:  # settled: only running out of memory moves the choice
            label = self.chosen[key]
            try:
                return label, call(dict(candidates)[label])
            except Exception as error:
                if not is_out_of_memory(error) or len(self._working(key)) < 2:
                    raise
                if undo is not None:
                    undo()
                self.exclude(key, label)
                if on_failure is not None:
                    on_failure(label, error)
            return self._run_first(key, call, self.chosen.get(key) or self._working(key)[0],
                                   undo, on_failure)
        position = self._calls.get(key, 0)
        working = self._working(key)
        if position == 0 or position >= self.steps:  # warm-up, or waiting for decide()
            self._calls[key] = max(position, 1)
            return self._run_first(key, call, working[0], undo, on_failure)
        self._calls[key] = position + 1
        label = candidates[(position - 1) % len(candidates)][0]
        times = self._times.setdefault(key, {})
        same = twin(label) if twin is not None else None
        if same is not None:
            self._twins.setdefault(key, {})[label] = same
        if same is not None or label not in working:  # the fastest measured runs instead
            measured = {k: min(v) for k, v in times.items() if v and k in working}
            label = min(measured, key=measured.__getitem__) if measured else (
                same if same in working else working[0])
            if same is None:  # an excluded or failed candidate's turn: its time not counted
                return self._run_first(key, call, label, undo, on_failure)
        start = self.clock()
        label, result = self._run_first(key, call, label, undo, on_failure)
        times.setdefault(label, []).append(self.clock() - start)
        return label, result

    def _working(self, key: Key) -> list[str]:
        """The labels of ``key``'s candidates neither excluded nor failed, in order (at
        least one)."""
        candidates = self.candidates_for(key)
        excluded = self.excluded.get(key, set())
        labels = [label for label, _ in candidates
                  if label not in self.failures and label not in excluded]
        return labels or [candidates[0][0]]

    def _run_first(self, key: Key, call: Callable[[Engine], Any], label: str,
                   undo: Callable[[], None] | None,
                   on_failure: Callable[[str, Exception], None] | None) -> tuple[str, Any]:
        """``call`` on ``label``'s engine, or on the next working candidate if it raises
        (out of memory: excluded for ``key``; any other error: a failure for every key)."""
        engines, tried, errors = dict(self.candidates_for(key)), [], []
        order = [label] + [other for other in self._working(key) if other != label]
        for current in order:
            try:
                return current, call(engines[current])
            except Exception as error:  # noqa: PERF203 - one try per candidate
                if undo is not None:
                    undo()
                tried.append(current)
                errors.append(error)
                if is_out_of_memory(error):
                    self.excluded.setdefault(key, set()).add(current)
                else:
                    text = str(error).strip()
                    self.failures[current] = (
                        f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300])
                if on_failure is not None:
                    on_failure(current, error)
        for current in tried:  # every candidate failed: the input's error, not theirs
            self.failures.pop(current, None)
        raise errors[0]

    def ready(self) -> list[Key]:
        """Batch shapes measured but not decided yet."""
        if len(self.chosen) >= len(self._calls):  # every shape seen is decided: asked per step
            return []
        return [k for k, n in self._calls.items() if n >= self.steps and k not in self.chosen]

    def decide(self, agree: Callable[[list[float]], list[float]] | None = None) -> None:
        """Choose the fastest candidate for every measured batch shape.

        Args:
            agree: combines the times with the other processes of a data-parallel job
                (e.g. their sum), so that every process makes the same choice.
        """
        for key in self.ready():
            times, twins = self._times[key], self._twins.get(key, {})
            excluded = self.excluded.get(key, set())
            labels = [label for label, _ in self.candidates_for(key)]
            # an excluded or failed candidate has no time (nor one another process measured)
            best = [math.inf if label in excluded or label in self.failures
                    else min(times.get(twins.get(label, label)) or [math.inf])
                    for label in labels]
            combined = agree(best) if agree is not None else best
            self.chosen[key] = labels[min(range(len(labels)), key=combined.__getitem__)]
            self.timings[key] = {label: t for label, t in zip(labels, combined)
                                 if math.isfinite(t)}
