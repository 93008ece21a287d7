"""The shape of one support example, so that the task dimension is never guessed.

A learner records the shape of one example (per input leaf) from every batch it
meta-trains or evaluates on, keeps it in its ``state_dict`` (so a loaded learner knows it
too), and checks later inputs against it: a batch ``[tasks, shots, ...]`` given to
``adapt`` (which would pool every task into one) and a single task ``[shots, ...]`` given
to ``meta_step`` or ``adapt_many`` (which would read its examples as tasks) are refused.
Before any batch was seen, the shapes that can be read both ways are warned about with
both readings spelled out.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._task import TaskBatch
from ._tree import Tree, describe, leaves, normalise

Shapes = tuple[tuple[int, ...], ...]

# The key a learner's state_dict holds the shapes under (nn.Module's extra-state key).
STATE_KEY = "_extra_state"


class AmbiguousShapeWarning(UserWarning):
    """An input shape reads both as one task and as several; fastmeta took the first."""


def _outside_fastmeta() -> int:
    """The ``stacklevel`` of the first caller outside the fastmeta package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = inspect.currentframe(), 0
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return max(level, 1)


class ExampleShapes(nn.Module):
    """The part of a learner that remembers the shape of one support example.

    The shapes travel in ``state_dict()`` (as an int64 tensor under ``_extra_state``), so a
    learner loaded from a checkpoint checks its inputs as the one that was saved did. A
    ``state_dict`` from a fastmeta before this entry loads as before.
    """

    _example_shapes: Shapes | None = None

    @property
    def example_shape(self) -> tuple[int, ...] | Shapes | None:
        """Shape of one support example (``None`` until a batch was seen or it is set).

        A tuple for models of one input tensor, one tuple per input tensor otherwise.
        Recorded by ``meta_step``, ``meta_loss`` and ``adapt_many``; set it to state the
        shape before any batch (``learner.example_shape = (1,)``), which also silences the
        warnings about shapes that read both as one task and as several.
        """
        shapes = self._example_shapes
        return shapes[0] if shapes is not None and len(shapes) == 1 else shapes

    @example_shape.setter
    def example_shape(self, value: object) -> None:
        self._example_shapes = None if value is None else as_shapes(value)

    def get_extra_state(self) -> Tensor:
        return encode(self._example_shapes)

    def set_extra_state(self, state: Any) -> None:
        self._example_shapes = decode(state)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # A state_dict from before the example shape was saved keeps what this one knows.
        state_dict.setdefault(prefix + STATE_KEY, encode(self._example_shapes))
        super()._load_from_state_dict(state_dict, prefix, *args)


def encode(shapes: Shapes | None) -> Tensor:
    """``shapes`` as a 1-D int64 tensor (empty when unknown): count, then rank and sizes."""
    if shapes is None:
        return torch.zeros(0, dtype=torch.int64)
    flat = [len(shapes)]
    for shape in shapes:
        flat += [len(shape), *shape]
    return torch.tensor(flat, dtype=torch.int64)


def decode(value: Any) -> Shapes | None:
    """Inverse of :func:`encode`; raises ``ValueError`` on anything else."""
    if not isinstance(value, Tensor) or value.dim() != 1 or value.is_floating_point():
        raise ValueError(f"the example shape in a learner's state_dict must be a 1-D integer "
                         f"tensor, got {value!r}")
    flat = [int(v) for v in value.tolist()]
    if not flat:
        return None
    count, at, shapes = flat[0], 1, []
    for _ in range(max(count, 0)):
        rank = flat[at] if at < len(flat) else -1
        if rank < 0:
            break
        shapes.append(tuple(flat[at + 1:at + 1 + rank]))
        at += 1 + rank
    if at != len(flat) or len(shapes) != count or any(
            size < 0 for shape in shapes for size in shape):
        raise ValueError(f"the example shape in a learner's state_dict is malformed: {flat}")
    return tuple(shapes)


def _is_shape(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in value)


def as_shapes(value: object) -> Shapes:
    """A user's ``example_shape``: one shape (``(1,)``) or one per input leaf."""
    if _is_shape(value):
        assert isinstance(value, Sequence)
        return (tuple(int(size) for size in value),)
    if isinstance(value, Sequence) and value and all(_is_shape(item) for item in value):
        return tuple(tuple(int(size) for size in item) for item in value)
    raise TypeError(
        f"example_shape must be the shape of one support example, e.g. (1,) or (3, 84, 84), "
        f"or a sequence of such shapes (one per input tensor), got {value!r}"
    )


def support_shapes(task: TaskBatch) -> Shapes:
    """The example shapes of a validated batch ``[tasks, shots, ...]``."""
    return tuple(tuple(leaf.shape[2:]) for leaf in leaves(task.support_x))


def _shown(shapes: Shapes) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)


def check_batch(task: TaskBatch, seen: Shapes | None) -> None:
    """Refuse (or, before any batch, warn about) a task that lacks its task dimension.

    ``task`` was read as ``[tasks, shots, ...]`` by ``meta_step`` or ``adapt_many``.
    """
    first = leaves(task.support_x)[0]
    shape = tuple(first.shape)
    if seen is not None:
        now = support_shapes(task)
        given = [tuple(leaf.shape) for leaf in leaves(task.support_x)]
        if len(now) == len(seen) and all(
                len(n) + 1 == len(e) and g[1:] == e for n, g, e in zip(now, given, seen)):
            tasks, shots = shape[:2]
            raise ValueError(
                f"support_x has shape {shape}, which reads as {tasks} tasks of {shots} "
                f"examples of shape {now[0]}, but this learner's examples are {_shown(seen)}: "
                f"it looks like one task of {tasks} examples without its task dimension. "
                f"Add it with x.unsqueeze(0) (and the same for y and the query set), or "
                f"use learner.adapt(x, y) for one task"
            )
        return
    if first.dim() == 2 and first.is_floating_point():
        tasks, shots = shape
        warnings.warn(
            f"support_x has shape {shape}, which reads two ways: {tasks} tasks of {shots} "
            f"scalar examples (how meta_step and adapt_many read it), or one task of "
            f"{tasks} examples of {shots} features without its task dimension (then add "
            f"it with x.unsqueeze(0)). Set learner.example_shape = () to confirm scalar "
            f"examples and silence this",
            AmbiguousShapeWarning, stacklevel=_outside_fastmeta(),
        )


def check_single_task(x: Tree, y: Tree | None, seen: Shapes | None) -> None:
    """Refuse (or, before any batch, warn about) a batch given to ``adapt`` as one task."""
    x = normalise(x)
    shapes = [tuple(leaf.shape) for leaf in leaves(x) if isinstance(leaf, Tensor)]
    if not shapes:
        return
    if seen is not None:
        if len(shapes) == len(seen) and all(
                len(s) == len(e) + 2 and s[2:] == e for s, e in zip(shapes, seen)):
            raise ValueError(
                f"adapt(x, y) adapts to one task ([shots, ...] inputs), but x has shape "
                f"{describe(x)}: one leading dimension more than the examples this learner "
                f"was meta-trained on ({_shown(seen)} each), as a batch [tasks, shots, ...] "
                f"would. Use learner.adapt_many(batch) for several tasks, or adapt(x[t], "
                f"y[t]) for task t"
            )
        return
    targets = [tuple(leaf.shape) for leaf in leaves(normalise(y)) if isinstance(leaf, Tensor)]
    first = shapes[0]
    if len(first) >= 3 and targets and all(
            len(t) >= 3 and t[:2] == first[:2] for t in targets):
        tasks, shots = first[:2]
        warnings.warn(
            f"adapt(x, y): x has shape {first} and y {targets[0]}, which read two ways: one "
            f"task of {tasks} examples of shape {first[1:]} (how adapt reads it), or "
            f"{tasks} tasks of {shots} examples of shape {first[2:]} pooled into one (then "
            f"use learner.adapt_many(batch), or adapt(x[t], y[t]) for task t). Set "
            f"learner.example_shape = {first[1:]} to confirm one task and silence this",
            AmbiguousShapeWarning, stacklevel=_outside_fastmeta(),
        )
