"""The task batch every learner consumes, and its parsing from torchmeta-style batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from torch import Tensor

# Accepted spellings of the two halves of a task, at the data boundary.
_SUPPORT_KEYS = ("support", "train")
_QUERY_KEYS = ("query", "test")


class TaskBatch(NamedTuple):
    """A meta-batch of tasks: support (inner-loop) and query (outer-loop) examples.

    (``fastmeta.Task`` is the same class under its former name; ``fastmeta.data.Task`` is
    torchmeta's dataset of one task's examples.)

    Every tensor has a leading task dimension: ``support_x`` is ``[tasks, shots, ...]``,
    ``support_y`` is ``[tasks, shots, ...]``, and likewise for the query set.
    ``support_y`` is ``None`` for unlabelled support sets, which only learners with a
    learned inner loss (:class:`fastmeta.DAML`) can adapt on.

    Example:
        >>> task = TaskBatch(torch.randn(4, 10, 1), torch.randn(4, 10, 1),
        ...             torch.randn(4, 15, 1), torch.randn(4, 15, 1))
        >>> task.num_tasks
        4
    """

    support_x: Tensor
    support_y: Tensor | None
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        """Number of tasks (the leading dimension)."""
        return int(self.support_x.shape[0])


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
        if isinstance(value, Tensor):
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
    validate_task(task)
    return task


def validate_task(task: TaskBatch) -> None:
    """Check shapes: same task count everywhere, same example count for x and y."""
    for name, value in zip(TaskBatch._fields, task):
        if value is None and name == "support_y":
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() < 2:
            raise ValueError(
                f"{name} must have shape [tasks, examples, ...], got shape {tuple(value.shape)}; "
                f"for a single task add a leading dimension with .unsqueeze(0)"
            )
    for prefix in ("support", "query"):
        x, y = getattr(task, f"{prefix}_x"), getattr(task, f"{prefix}_y")
        if y is not None and x.shape[:2] != y.shape[:2]:
            raise ValueError(
                f"{prefix}_x and {prefix}_y must agree on [tasks, examples], got "
                f"{tuple(x.shape[:2])} and {tuple(y.shape[:2])}"
            )
    if task.support_x.shape[0] != task.query_x.shape[0]:
        raise ValueError(
            f"support and query sets must hold the same number of tasks, got "
            f"{task.support_x.shape[0]} support and {task.query_x.shape[0]} query tasks"
        )
    if task.support_x.shape[0] == 0:
        raise ValueError("the batch holds no tasks (task dimension is 0)")
    if task.support_x.shape[1] == 0:
        raise ValueError(
            "the support set is empty (0 examples per task): the inner loop needs at least one "
            "example to adapt on"
        )


def to_model(task: TaskBatch, reference: Tensor) -> TaskBatch:
    """Move a task to the device of ``reference`` and cast floating tensors to its dtype.

    Integer targets (class labels) keep their dtype. torchmeta's toy datasets yield
    float64 while models are usually float32; casting here spares users that error.
    """

    def move(value: Tensor | None) -> Tensor | None:
        if value is None:
            return None
        dtype = reference.dtype if value.is_floating_point() else value.dtype
        return value.to(device=reference.device, dtype=dtype)

    return TaskBatch(*(move(value) for value in task))  # type: ignore[arg-type]


def single_task(x: Tensor, y: Tensor | None, name_x: str = "x", name_y: str = "y") -> TaskBatch:
    """A one-task :class:`TaskBatch` from one task's support set (query = support).

    ``y=None`` gives an unlabelled support set; the query half then repeats the inputs
    as placeholder targets (``adapt`` never evaluates the query half).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name_x} must be a torch.Tensor, got {type(x).__name__}")
    if y is None:
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(
                f"{name_x} must hold at least one example along dim 0, got shape {tuple(x.shape)}"
            )
        x = x.unsqueeze(0)
        return TaskBatch(x, None, x, x)
    if not isinstance(y, Tensor):
        raise TypeError(f"{name_y} must be a torch.Tensor, got {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name_x} and {name_y} must hold the same number of examples along dim 0, got "
            f"shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name_x} is empty: adapt needs at least one support example")
    x, y = x.unsqueeze(0), y.unsqueeze(0)
    return TaskBatch(x, y, x, y)
