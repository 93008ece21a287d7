"""Task loaders: ``MetaDataLoader`` (lists of tasks) and ``BatchMetaDataLoader`` (tensors)."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from fastmeta.data import _seeding
from fastmeta.data._protocol import CombinationMetaDataset


def no_collate(batch: list[Any]) -> list[Any]:
    """Return the batch of tasks unchanged (``MetaDataLoader``'s default)."""
    return batch


class BatchMetaCollate:
    """Collate a list of tasks into ``OrderedDict(split -> [inputs, targets])`` of stacked tensors.

    Each task (a dataset of ``(input, target)`` pairs, an ``OrderedDict`` of
    such datasets, or an ``(inputs, targets)`` pair of tensors) becomes
    ``[inputs, targets]`` of shape ``[shots, ...]``; the tasks are then stacked
    into ``[batch, shots, ...]``.

    Args:
        collate_fn: Turns the list of samples of one task into tensors.

    Example:
        >>> from fastmeta.data import sinusoid
        >>> batch = BatchMetaCollate()([sinusoid(5, seed=0)[i] for i in range(3)])
        >>> batch["train"][0].shape, batch["test"][1].shape
        (torch.Size([3, 5, 1]), torch.Size([3, 5, 1]))
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] = default_collate) -> None:
        self.collate_fn = collate_fn

    def collate_task(self, task: Any) -> Any:
        """Turn one task (or split task) into ``[inputs, targets]`` tensors."""
        if isinstance(task, Mapping):
            return OrderedDict((key, self.collate_task(sub)) for key, sub in task.items())
        if _is_pair(task):
            return [_tensors(part) for part in task]
        if not (hasattr(task, "__len__") and hasattr(task, "__getitem__")):
            raise TypeError(
                "a task must be a dataset of (input, target) pairs, an OrderedDict of them, or "
                f"an (inputs, targets) pair of tensors; got {type(task).__name__}"
            )
        indices = range(len(task))
        stack = getattr(task, "_stack", None)
        stacked = stack(indices) if stack is not None and indices else None
        if stacked is not None:
            return list(stacked)
        getitems = getattr(task, "__getitems__", None)
        samples = getitems(list(indices)) if getitems is not None else [task[i] for i in indices]
        return self.collate_fn(samples)

    def __call__(self, batch: Sequence[Any]) -> Any:
        return _stack_tasks([self.collate_task(task) for task in batch], "batch")


def _stack_tasks(items: list[Any], where: str) -> Any:
    first = items[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for position, item in enumerate(items):
            if not isinstance(item, Mapping) or list(item) != keys:
                found = list(item) if isinstance(item, Mapping) else type(item).__name__
                raise ValueError(
                    f"task {position} of the batch has splits {found}, task 0 has {keys}; "
                    "every task of a batch needs the same splits"
                )
        return OrderedDict(
            (key, _stack_tasks([item[key] for item in items], f"{key!r}")) for key in keys
        )
    if isinstance(first, list | tuple) and not hasattr(first, "_fields"):
        stacked = [_stack_tasks([item[i] for item in items], f"{where}[{i}]")
                   for i in range(len(first))]
        return tuple(stacked) if isinstance(first, tuple) else stacked
    return _stack_tensors(items, where)


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray)


def _is_inputs(value: Any) -> bool:
    """A tensor or array, or a tuple or mapping of them (a model's several inputs)."""
    if _is_array(value):
        return True
    if isinstance(value, Mapping):
        return bool(value) and all(_is_inputs(v) for v in value.values())
    if isinstance(value, tuple | list):
        return bool(value) and all(_is_inputs(v) for v in value)
    return False


def _is_pair(task: Any) -> bool:
    """An ``(inputs, targets)`` pair of one task's stacked examples (tensors or numpy
    arrays; the inputs may be a tuple or mapping of them), not a list of samples."""
    return (isinstance(task, tuple | list) and len(task) == 2 and _is_array(task[1])
            and _is_inputs(task[0])) or (
        isinstance(task, tuple | list) and bool(task) and all(_is_array(t) for t in task))


def _tensors(value: Any) -> Any:
    """Numpy arrays (at any depth) as tensors."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, Mapping):
        return OrderedDict((k, _tensors(v)) for k, v in value.items()) if isinstance(
            value, OrderedDict) else {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_tensors(v) for v in value)
    return value


def _stack_tensors(tensors: list[Any], where: str) -> torch.Tensor:
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in tensors]
    shape = tensors[0].shape
    for position, tensor in enumerate(tensors):
        if tensor.shape != shape:
            raise ValueError(
                f"{where}: task {position} has shape {list(tensor.shape)} but task 0 has "
                f"{list(shape)}; tasks stacked in a batch need the same shots and input shape "
                "(use MetaDataLoader for tasks of different sizes)"
            )
    return torch.stack(tensors)


class CombinationSequentialSampler(Sampler[tuple[int, ...]]):
    """Yield every combination of ``num_classes_per_task`` classes in lexicographic order.

    Args:
        data_source: A ``CombinationMetaDataset``.
    """

    def __init__(self, data_source: CombinationMetaDataset) -> None:
        _check_combination(data_source, type(self).__name__)
        self.data_source = data_source

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        ds = self.data_source
        return itertools.combinations(range(len(ds.dataset)), ds.num_classes_per_task)

    def __len__(self) -> int:
        return len(self.data_source)


class CombinationRandomSampler(Sampler[tuple[int, ...]]):
    """Yield random class combinations (in random order) without global RNG state.

    Each iteration draws a new stream from ``generator`` (a ``torch.Generator``,
    or the dataset's seed when none is given), so the sequence is reproducible.

    Args:
        data_source: A ``CombinationMetaDataset``.
        generator: Source of the per-iteration seeds.
    """

    def __init__(
        self, data_source: CombinationMetaDataset, generator: torch.Generator | None = None
    ) -> None:
        _check_combination(data_source, type(self).__name__)
        self.data_source = data_source
        if generator is None:
            generator = torch.Generator()
            seed = _seeding.derive_seed(data_source.initial_seed(), _seeding.STREAM_SAMPLER)
            generator.manual_seed(seed)
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        ds = self.data_source
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        rng = np.random.default_rng(seed)
        num_classes, ways = len(ds.dataset), ds.num_classes_per_task
        for _ in range(len(self)):
            yield tuple(int(c) for c in rng.choice(num_classes, size=ways, replace=False))

    def __len__(self) -> int:
        return len(self.data_source)


def _check_combination(data_source: Any, name: str) -> None:
    if not isinstance(data_source, CombinationMetaDataset):
        raise TypeError(f"{name} needs a CombinationMetaDataset, got {type(data_source).__name__}")


class MetaDataLoader(DataLoader[Any]):
    """A ``DataLoader`` over tasks; each batch is a list of tasks.

    It follows torchmeta's loader, plus:

    * a ``CombinationMetaDataset`` is sampled with ``CombinationRandomSampler``
      (``shuffle=True``) or ``CombinationSequentialSampler``;
    * for fastmeta's meta-datasets, shuffling is seeded from the dataset's seed
      unless a ``generator`` is given, so the batches are reproducible;
    * each ``iter(loader)`` calls ``dataset.set_epoch(epoch)`` (when the dataset
      has it) before workers start, so per-epoch draws such as sine inputs are
      fresh every epoch and identical with any ``num_workers``. With
      ``persistent_workers=True`` the workers keep their first copy, so every
      epoch reuses epoch 0's draws for a given task index.

    Args:
        dataset: A meta-dataset: ``len()`` and ``dataset[index]`` returning a task.
        batch_size: Tasks per batch (the meta-batch size).
        shuffle: Visit tasks in random order (ignored with a custom sampler).
        sampler: Custom sampler of task indices.
        batch_sampler: Custom sampler of lists of task indices.
        num_workers: Worker processes.
        collate_fn: Turns the list of tasks into a batch (default: keep the list).
        pin_memory: Passed to ``DataLoader``.
        drop_last: Passed to ``DataLoader``.
        timeout: Passed to ``DataLoader``.
        worker_init_fn: Passed to ``DataLoader``.
        **kwargs: Other ``DataLoader`` arguments (``generator``,
            ``persistent_workers``, ``prefetch_factor``, ...).

    Example:
        >>> from fastmeta.data import sinusoid
        >>> tasks = next(iter(MetaDataLoader(sinusoid(5, seed=0), batch_size=4)))
        >>> len(tasks), sorted(tasks[0])
        (4, ['test', 'train'])
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool = True,
        sampler: Any = None,
        batch_sampler: Any = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if collate_fn is None:
            collate_fn = no_collate
        custom = sampler is not None or batch_sampler is not None
        if custom:
            shuffle = False  # the sampler decides the order
        if isinstance(dataset, CombinationMetaDataset) and not custom:
            if shuffle:
                sampler = CombinationRandomSampler(dataset, generator=kwargs.get("generator"))
            else:
                sampler = CombinationSequentialSampler(dataset)
            shuffle = False
        elif shuffle and not custom and kwargs.get("generator") is None:
            initial_seed = getattr(dataset, "initial_seed", None)
            if initial_seed is not None:
                generator = torch.Generator()
                generator.manual_seed(_seeding.derive_seed(initial_seed(), _seeding.STREAM_SAMPLER))
                kwargs["generator"] = generator
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            **kwargs,
        )
        self._next_epoch = 0

    def __iter__(self) -> Any:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self._next_epoch)
        self._next_epoch += 1
        return super().__iter__()


class BatchMetaDataLoader(MetaDataLoader):
    """A ``DataLoader`` whose batches are stacked tensors, exactly as torchmeta's.

    A batch is an ``OrderedDict`` with the splits' keys (``"train"``/``"test"``
    or ``"support"``/``"query"``), each a list ``[inputs, targets]`` of shape
    ``[batch_size, shots, ...]``: what every fastmeta learner's ``meta_step``
    takes. Sampling, seeding and epochs work as in ``MetaDataLoader``.

    Args:
        dataset: A meta-dataset whose tasks are split (e.g. by ``ClassSplitter``).
        batch_size: Tasks per batch (the meta-batch size).
        shuffle: Visit tasks in random order.
        sampler: Custom sampler of task indices.
        num_workers: Worker processes.
        pin_memory: Passed to ``DataLoader``.
        drop_last: Passed to ``DataLoader``.
        timeout: Passed to ``DataLoader``.
        worker_init_fn: Passed to ``DataLoader``.
        **kwargs: Other ``DataLoader`` arguments.

    Example:
        >>> from fastmeta.data import sinusoid
        >>> loader = BatchMetaDataLoader(sinusoid(10, test_shots=15, seed=0), batch_size=25)
        >>> batch = next(iter(loader))
        >>> inputs, targets = batch["train"]
        >>> inputs.shape, batch["test"][1].shape, inputs.dtype
        (torch.Size([25, 10, 1]), torch.Size([25, 15, 1]), torch.float32)
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        shuffle: bool = True,
        sampler: Any = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if "collate_fn" in kwargs or "batch_sampler" in kwargs:
            raise TypeError(
                "BatchMetaDataLoader collates tasks itself; use MetaDataLoader(collate_fn=...) "
                "for a custom collate function or batch sampler. (Under a Lightning Trainer "
                "with several processes, Lightning re-creates loaders this way to add its "
                "distributed sampler: pass Trainer(use_distributed_sampler=False), and "
                "fastmeta.lightning.MetaModule(..., shard_batches=True) splits each meta-batch "
                "between the processes)"
            )
        super().__init__(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=BatchMetaCollate(default_collate),
            pin_memory=pin_memory,
            drop_last=drop_last,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            **kwargs,
        )
