"""This process's share of a meta-batch."""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, cast

from torch import Tensor
from torch.distributed import ProcessGroup

from .._task import TaskBatch, as_task
from ._process import rank as _rank
from ._process import world_size as _world_size

Batch = TypeVar("Batch", TaskBatch, Mapping[str, Any], Sequence[Tensor])


def shard_bounds(num_tasks: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """Tasks ``[start, stop)`` of rank ``rank`` when ``num_tasks`` are split over processes.

    Contiguous shares in rank order whose sizes differ by at most one: the first
    ``num_tasks % world_size`` ranks take one task more (as ``numpy.array_split``). So
    the shares, concatenated in rank order, are the meta-batch.

    Example:
        >>> [shard_bounds(5, rank=r, world_size=2) for r in range(2)]
        [(0, 3), (3, 5)]

    Raises:
        ValueError: fewer tasks than processes (a process would have none), or a rank
            outside ``[0, world_size)``.
    """
    for name, value, minimum in (("num_tasks", num_tasks, 0), ("world_size", world_size, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    if num_tasks < world_size:
        raise ValueError(
            f"the meta-batch holds {num_tasks} task(s), fewer than the {world_size} processes: "
            f"every process needs at least one task. Use a meta-batch size >= {world_size} "
            f"or fewer processes (torchrun --nproc_per_node)"
        )
    base, extra = divmod(int(num_tasks), int(world_size))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(
    batch: Batch,
    *,
    group: ProcessGroup | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> Batch:
    """This process's share of a full meta-batch, in the form it came in.

    Every process draws the same full meta-batch (same loader, same seed) and keeps its
    slice (:func:`shard_bounds`), so the union over processes is exactly the meta-batch
    one process would train on. The price is that every process builds the whole batch:
    nothing for the sine tasks (microseconds), ``world_size`` times the loading work for
    image tasks. Outside a distributed job (one process) the batch comes back unchanged.

    Args:
        batch: a :class:`fastmeta.TaskBatch`, a torchmeta-style mapping
            ``{"train": [x, y], "test": [x, y]}`` (every tensor in it is sliced along the
            task dimension) or a 4-tuple of tensors.
        group: the process group (default: the whole job).
        rank: this process's rank instead of the group's (with ``world_size``).
        world_size: the number of processes instead of the group's.

    Returns:
        The same kind of batch with this process's tasks only.

    Raises:
        ValueError: fewer tasks than processes.

    Example:
        >>> for batch in loader:                      # the same batches on every rank
        ...     learner.meta_step(fastmeta.distributed.shard(batch), optimizer)
    """
    if world_size is None:
        world_size = _world_size(group)
    if rank is None:
        rank = _rank(group)
    num_tasks = as_task(batch).num_tasks
    start, stop = shard_bounds(num_tasks, rank=rank, world_size=world_size)
    if world_size == 1:
        return batch

    def cut(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value[start:stop]
        if isinstance(value, Mapping):
            return OrderedDict((key, cut(item)) for key, item in value.items())
        if isinstance(value, list | tuple) and not isinstance(value, TaskBatch):
            return type(value)(cut(item) for item in value)
        return value

    if isinstance(batch, TaskBatch):  # support_y is None for unlabelled support sets (DAML)
        parts = [None if v is None else cut(v) for v in batch]
        return cast(Batch, TaskBatch._make(parts))
    return cut(batch)
