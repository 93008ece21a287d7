"""The task batch every learner consumes, and its parsing from torchmeta-style batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._tree import Tree, describe, first_leaf, is_tree_node, leaves, normalise, tree_map

# Integer dtypes of class labels that torch's losses refuse (they index with int64).
_NARROW_INTEGERS = (torch.int8, torch.int16, torch.int32)

# Accepted spellings of the two halves of a task, at the data boundary.
_SUPPORT_KEYS = ("support", "train")
_QUERY_KEYS = ("query", "test")


class TaskBatch(NamedTuple):
    """A meta-batch of tasks: support (inner-loop) and query (outer-loop) examples.

    (``fastmeta.Task`` is the same class under its former name; ``fastmeta.data.Task`` is
    torchmeta's dataset of one task's examples.)

    Every tensor has a leading task dimension: ``support_x`` is ``[tasks, shots, ...]``,
    ``support_y`` is ``[tasks, shots, ...]``, and likewise for the query set.
    Inputs (and targets) may also be trees of such tensors: a tuple (the model's positional
    arguments, e.g. ``(x, edge_index)``) or a mapping (its keyword arguments, e.g.
    ``{"input_ids": ..., "attention_mask": ...}``), nested; every leaf is
    ``[tasks, shots, ...]``.
    ``support_y`` is ``None`` for unlabelled support sets, which only learners with a
    learned inner loss (:class:`fastmeta.DAML`) can adapt on.

    Example:
        >>> task = TaskBatch(torch.randn(4, 10, 1), torch.randn(4, 10, 1),
        ...             torch.randn(4, 15, 1), torch.randn(4, 15, 1))
        >>> task.num_tasks
        4
    """

    support_x: Tree
    support_y: Tree | None
    query_x: Tree
    query_y: Tree

    @property
    def num_tasks(self) -> int:
        """Number of tasks (the leading dimension)."""
        return int(first_leaf(self.support_x).shape[0])

    @property
    def support_shots(self) -> int:
        """Number of support examples per task (the second dimension)."""
        return int(first_leaf(self.support_x).shape[1])

    def check_per_example(self, why: str) -> None:
        """Raise unless every support and query leaf is ``[tasks, shots, ...]`` with the
        shots of its part (``why`` says what needs it, e.g. minibatch inner steps)."""
        for name in ("support_x", "support_y", "query_x", "query_y"):
            tree = getattr(self, name)
            found = leaves(tree)
            if not found:
                continue
            shots = int(leaves(getattr(self, name[:-1] + "x"))[0].shape[1])
            odd = [tuple(leaf.shape) for leaf in found if int(leaf.shape[1]) != shots]
            if odd:
                raise ValueError(
                    f"{why} needs every tensor of {name} to be [tasks, shots, ...] with "
                    f"{shots} shots, but it holds tensors of shape {odd} (per-task context "
                    f"such as a graph's edges); use full-batch steps for such inputs"
                )


def _pair(batch: Mapping[str, Any], keys: tuple[str, ...], role: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one half; a support set may be inputs alone."""
    for key in keys:
        if key in batch:
            value = batch[key]
            break
    else:
        raise KeyError(
            f"batch has no {role} set: expected one of the keys {list(keys)}, got "
            f"{list(batch.keys())}. A torchmeta-style batch is "
            f"{{'train': [x, y], 'test': [x, y]}} (or 'support'/'query')"
        )
    if role == "support":  # unlabelled: a bare tensor, [inputs] or [inputs, None]
        if isinstance(value, Tensor | Mapping):
            return value, None
        inputs_only = isinstance(value, Sequence) and not isinstance(value, str) and (
            len(value) == 1 or (len(value) == 2 and value[1] is None)
        )
        if inputs_only:
            return value[0], None
    if not isinstance(value, Sequence) or isinstance(value, (str, Tensor)) or len(value) != 2:
        raise ValueError(
            f"batch[{key!r}] must be a pair [inputs, targets]"
            + (" (or [inputs] alone for an unlabelled support set)" if role == "support" else "")
            + f", got {type(value).__name__}"
            + (f" of length {len(value)}" if isinstance(value, Sequence) else "")
        )
    return value[0], value[1]


def as_task(batch: TaskBatch | Mapping[str, Any] | Sequence[Tensor]) -> TaskBatch:
    """Turn a torchmeta-style batch (or a 4-tuple) into a :class:`TaskBatch` and validate it.

    Args:
        batch: ``{"train": [x, y], "test": [x, y]}`` (keys ``support``/``query`` also
            accepted), a :class:`TaskBatch`, or a tuple
            ``(support_x, support_y, query_x, query_y)``.
            An unlabelled support set is ``"train": [x]`` (or ``x``, or ``[x, None]``) and
            gives ``support_y=None``.

    Returns:
        The validated :class:`TaskBatch`.

    Raises:
        KeyError: a support or query part is missing.
        TypeError: a part is not a tensor.
        ValueError: inconsistent task counts, example counts, or an empty support set.
    """
    if isinstance(batch, TaskBatch):
        task = batch
    elif isinstance(batch, Mapping):
        task = TaskBatch(*_pair(batch, _SUPPORT_KEYS, "support"),
                         *_pair(batch, _QUERY_KEYS, "query"))
    elif isinstance(batch, Sequence) and len(batch) == 4:
        task = TaskBatch(*batch)
    else:
        raise TypeError(
            f"batch must be a fastmeta.TaskBatch, a mapping {{'train': [x, y], 'test': [x, y]}} or "
            f"a tuple (support_x, support_y, query_x, query_y), got {type(batch).__name__}"
        )
    task = TaskBatch(*(normalise(part) for part in task))
    validate_task(task)
    return task


def plain_task(batch: Any) -> TaskBatch | None:
    """``batch`` as a :class:`TaskBatch` without a copy or a check, where it is one of
    four plain tensors (a ``TaskBatch``, or ``{"train": [x, y], "test": [x, y]}``);
    ``None`` otherwise. The caller validates it, or knows its shapes passed."""
    if isinstance(batch, TaskBatch):
        task = batch
    elif type(batch) is dict and len(batch) == 2:
        support = next((batch[key] for key in _SUPPORT_KEYS if key in batch), None)
        query = next((batch[key] for key in _QUERY_KEYS if key in batch), None)
        if not (isinstance(support, list | tuple) and isinstance(query, list | tuple)
                and len(support) == 2 and len(query) == 2):
            return None
        task = TaskBatch(support[0], support[1], query[0], query[1])
    else:
        return None
    return task if all(type(part) is Tensor for part in task) else None


def _leaf_shapes(name: str, value: Tree) -> list[tuple[str, Tensor]]:
    """``(where, leaf)`` of every leaf of one part, each checked to be a tensor."""
    found: list[tuple[str, Tensor]] = []

    def visit(where: str, item: Any) -> None:
        if isinstance(item, Mapping):
            if not item:
                raise ValueError(f"{where} is an empty mapping; it must hold tensors")
            for key, sub in item.items():
                visit(f"{where}[{key!r}]", sub)
        elif is_tree_node(item):
            if not item:
                raise ValueError(f"{where} is an empty {type(item).__name__}; it must hold "
                                 f"tensors")
            for position, sub in enumerate(item):
                visit(f"{where}[{position}]", sub)
        elif isinstance(item, Tensor):
            if item.is_meta:
                raise ValueError(
                    f"{where} is on the meta device (shape {tuple(item.shape)}, no values): "
                    f"build the batch on a real device (the meta device is for shapes only)"
                )
            found.append((where, item))
        else:
            held = "" if where == name else f" holding a {type(item).__name__} at {where}"
            raise TypeError(
                f"{name} must be a torch.Tensor (or a tuple or mapping of tensors), got "
                f"{type(value).__name__}{held}; convert it with torch.as_tensor"
            )

    visit(name, value)
    return found


def validate_task(task: TaskBatch) -> None:
    """Check shapes: same task count everywhere, same example count for x and y.

    Inputs and targets may be trees (tuples, mappings) of tensors: every leaf is checked.
    Every leaf has the tasks along dim 0; the examples of a part are dim 1 of its first
    leaf. Other leaves usually share it (``[tasks, shots, ...]``), but need not: a leaf of
    per-task context, such as the ``edge_index`` ``[tasks, 2, edges]`` of one graph per
    task, is passed to the model whole.
    """
    # With plain tensors the checks depend on the shapes alone: each shape is checked once.
    shapes = shapes_of(task)
    if shapes is not None and shapes in _VALID_SHAPES:
        return
    _validate_task(task)
    if shapes is not None:
        if len(_VALID_SHAPES) > 4096:
            _VALID_SHAPES.clear()
        _VALID_SHAPES.add(shapes)


def shapes_of(task: TaskBatch) -> tuple[Any, ...] | None:
    """Shape, dtype and device of each part of a batch of plain tensors (``None`` for an
    unlabelled support set); ``None`` if a part is a tree of tensors."""
    if not all(isinstance(part, Tensor) or part is None for part in task):
        return None
    return tuple(None if part is None else (part.shape, part.dtype, part.device)
                 for part in task)


_VALID_SHAPES: set[tuple[Any, ...]] = set()


def _validate_task(task: TaskBatch) -> None:
    heads: dict[str, tuple[int, int]] = {}
    for name, value in zip(TaskBatch._fields, task):
        if value is None and name == "support_y":
            continue
        first: tuple[str, Tensor] | None = None
        for where, leaf in _leaf_shapes(name, value):
            if leaf.dim() < 2:
                raise ValueError(
                    f"{where} must have shape [tasks, examples, ...], got shape "
                    f"{tuple(leaf.shape)}; for a single task add a leading dimension with "
                    f".unsqueeze(0)"
                )
            if first is None:
                first = (where, leaf)
            elif leaf.shape[0] != first[1].shape[0]:
                raise ValueError(
                    f"every tensor of {name} must have one slice per task along dim 0: "
                    f"{first[0]} holds {first[1].shape[0]} tasks but {where} holds "
                    f"{leaf.shape[0]}"
                )
        assert first is not None
        heads[name] = (int(first[1].shape[0]), int(first[1].shape[1]))
    for prefix in ("support", "query"):
        x, y = heads[f"{prefix}_x"], heads.get(f"{prefix}_y")
        if y is not None and x != y:
            raise ValueError(
                f"{prefix}_x and {prefix}_y must agree on [tasks, examples], got "
                f"{x} and {y}"
            )
    if heads["support_x"][0] != heads["query_x"][0]:
        raise ValueError(
            f"support and query sets must hold the same number of tasks, got "
            f"{heads['support_x'][0]} support and {heads['query_x'][0]} query tasks"
        )
    if heads["support_x"][0] == 0:
        raise ValueError("the batch holds no tasks (task dimension is 0)")
    if heads["support_x"][1] == 0:
        raise ValueError(
            "the support set is empty (0 examples per task): the inner loop needs at least one "
            "example to adapt on"
        )
    if heads["query_x"][1] == 0:
        raise ValueError(
            "the query set is empty (0 examples per task): the meta-loss is the query loss "
            "after adaptation, so each task needs at least one query example (adapt_many "
            "only adapts: pass the support set as the query set there)"
        )


def to_model(task: TaskBatch, reference: Tensor) -> TaskBatch:
    """Move a task to the device of ``reference`` and cast floating tensors to its dtype.

    torchmeta's toy datasets yield float64 while models are usually float32; casting here
    spares users that error. Integer targets narrower than int64 (class labels as int32)
    become int64, which torch's losses index with (``vmap`` accepted int32 where the
    per-task engines did not); integer inputs (token ids) keep their dtype.
    """

    def move(value: Tensor) -> Tensor:
        dtype = reference.dtype if value.is_floating_point() else value.dtype
        if value.dtype == dtype and value.device == reference.device:
            return value  # as .to() would, without its call
        return value.to(device=reference.device, dtype=dtype)

    def move_target(value: Tensor) -> Tensor:
        if value.dtype in _NARROW_INTEGERS:
            return value.to(device=reference.device, dtype=torch.int64)
        return move(value)

    return TaskBatch(*(tree_map(move_target if name.endswith("_y") else move, value)
                       for name, value in zip(TaskBatch._fields, task)))


def single_task(x: Tree, y: Tree | None, name_x: str = "x", name_y: str = "y") -> TaskBatch:
    """A one-task :class:`TaskBatch` from one task's support set (query = support).

    ``x`` (and ``y``) may be trees (a tuple or mapping of tensors) whose leaves are
    ``[shots, ...]``. ``y=None`` gives an unlabelled support set; the query half then
    repeats the inputs as placeholder targets (``adapt`` never evaluates the query half).
    """
    x = normalise(x)
    y = normalise(y)
    for name, value in ((name_x, x), (name_y, y)):
        if value is None and name == name_y:
            continue
        for where, leaf in _leaf_shapes(name, value):
            if leaf.dim() == 0:
                raise ValueError(
                    f"{where} must hold at least one example along dim 0, got shape "
                    f"{tuple(leaf.shape)}"
                )
            if leaf.shape[0] == 0:
                raise ValueError(f"{where} is empty: adapt needs at least one support example")
    shots = {int(leaf.shape[0]) for leaf in leaves(x)[:1] + leaves(y)}
    if len(shots) > 1:
        raise ValueError(
            f"{name_x} and {name_y} must hold the same number of examples along dim 0, got "
            f"shapes {describe(x)} and {describe(y)}"
        )
    x = tree_map(lambda leaf: leaf.unsqueeze(0), x)
    if y is None:
        return TaskBatch(x, None, x, x)
    y = tree_map(lambda leaf: leaf.unsqueeze(0), y)
    return TaskBatch(x, y, x, y)
