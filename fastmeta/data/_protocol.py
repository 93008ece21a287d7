"""torchmeta's task protocol: tasks, meta-datasets, class datasets, class combinations.

A *task* is a ``torch.utils.data.Dataset`` of ``(input, target)`` pairs. A
*meta-dataset* has ``__len__`` (the number of tasks) and ``__getitem__(index)``
returning a task, or, once a splitter is its ``dataset_transform``, an
``OrderedDict`` of split name to task. Class-combination meta-datasets are
indexed by a tuple of class ids, one task per N-way combination.

Differences from torchmeta, all deliberate:

* task content is a pure function of ``(seed, index, epoch)``, never of global
  RNG state, so tasks are reproducible and differ across data-loader workers;
* ``SubsetTask`` implements ``__getitems__`` (torch 2.x calls it);
* tasks can hand whole tensors to the collate function (``_stack``), which
  keeps loading cheap next to a vectorised meta-step.
"""

from __future__ import annotations

import bisect
import itertools
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fastmeta.data import _seeding
from fastmeta.data._transforms import Categorical

Stacked = tuple[torch.Tensor, torch.Tensor]
META_SPLITS = ("train", "val", "test")


def resolve_meta_split(
    meta_train: bool, meta_val: bool, meta_test: bool, meta_split: str | None
) -> str:
    """Return the split name from torchmeta's ``meta_*`` flags or ``meta_split``.

    Raises:
        ValueError: If no split or several splits are chosen, or the name is unknown.
    """
    flags = {"train": meta_train, "val": meta_val, "test": meta_test}
    chosen = [name for name, flag in flags.items() if flag]
    if len(chosen) > 1:
        raise ValueError(
            f"choose one meta-split, got meta_train={meta_train}, meta_val={meta_val}, "
            f"meta_test={meta_test}; set exactly one of them, or pass meta_split='train'"
        )
    if chosen:
        if meta_split is not None and meta_split != chosen[0]:
            raise ValueError(
                f"meta_split={meta_split!r} contradicts meta_{chosen[0]}=True; pass only one"
            )
        return chosen[0]
    if meta_split is None:
        raise ValueError(
            "the meta-split is undefined: pass meta_split='train' (or 'val'/'test'), "
            "or meta_train=True (or meta_val/meta_test)"
        )
    if meta_split not in META_SPLITS:
        raise ValueError(f"meta_split must be one of {META_SPLITS}, got {meta_split!r}")
    return meta_split


class Task(Dataset[Any]):
    """One task: a dataset of ``(input, target)`` pairs.

    Subclasses implement ``__len__`` and ``__getitem__``. ``num_classes`` is
    ``None`` for regression tasks (``ClassSplitter`` then treats all samples as
    one class).

    Args:
        index: The task's index in its meta-dataset (an int, or a tuple of
            class ids for class-combination tasks).
        num_classes: Number of classes, or ``None`` for regression.
        transform: Applied to each input on ``__getitem__``.
        target_transform: Applied to each target on ``__getitem__``.

    Example:
        >>> class Line(Task):
        ...     def __len__(self):
        ...         return 3
        ...     def __getitem__(self, i):
        ...         return torch.tensor([float(i)]), torch.tensor([2.0 * i])
        >>> Line(0, None)[2]
        (tensor([2.]), tensor([4.]))
    """

    # Key parts that seed this task's random choices (dataset seed, epoch, index).
    _rng_key: tuple[int, ...] | None = None
    # True when samples are independent draws, so any subset is as random as another.
    _iid_samples: bool = False

    def __init__(
        self,
        index: Any,
        num_classes: int | None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.index = index
        self.num_classes = num_classes
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__")

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Return the samples at ``indices`` (torch's batched-fetch protocol)."""
        return [self[i] for i in indices]

    def _stack(self, indices: Sequence[int]) -> Stacked | None:
        """Return ``(inputs, targets)`` stacked over ``indices``, or None if unsupported.

        The collate function tries this first; it must equal stacking the samples.
        """
        return None


class ConcatTask(Task):
    """The concatenation of several class tasks into one N-way task.

    A class dataset with a ``label`` attribute (``ClassTask``) has that label
    as the target of every sample; ``target_transform`` then maps it.

    Args:
        datasets: One dataset per class, in label order.
        num_classes: Number of classes in the task.
        target_transform: Applied to each target after the class dataset's own
            transforms (``CombinationMetaDataset`` passes a fresh ``Categorical``).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset[Any]],
        num_classes: int,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        index = tuple(getattr(d, "index", None) for d in datasets)
        super().__init__(index, num_classes, target_transform=target_transform)
        self.datasets = list(datasets)
        self.cumulative_sizes = list(itertools.accumulate(len(d) for d in self.datasets))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.cumulative_sizes[-1] if self.cumulative_sizes else 0

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a task of {len(self)} samples")
        index %= len(self)
        which = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[which - 1] if which else 0
        return which, index - start

    def __getitem__(self, index: int) -> Any:
        which, local = self._locate(index)
        sample = self.datasets[which][local]
        if self.target_transform is None:
            return sample
        return (*sample[:-1], self.target_transform(sample[-1]))

    def _stack(self, indices: Sequence[int]) -> Stacked | None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return None
        which = np.searchsorted(self.cumulative_sizes, idx, side="right")
        inputs, targets, positions = [], [], []
        for j in np.unique(which):
            dataset = self.datasets[int(j)]
            stack = getattr(dataset, "_stack", None)
            if stack is None:
                return None
            mask = which == j
            start = self.cumulative_sizes[j - 1] if j else 0
            part = stack((idx[mask] - start).tolist())
            if part is None:
                return None
            inputs.append(part[0])
            targets.append(self._map_targets(part[1], getattr(dataset, "label", None)))
            positions.append(np.flatnonzero(mask))
        x, y = torch.cat(inputs), torch.cat(targets)
        where = np.concatenate(positions)
        if np.any(np.diff(where) < 0):  # classes interleaved: restore the requested order
            order = torch.from_numpy(np.argsort(where, kind="stable"))
            # index_select: advanced indexing can stall on busy CPUs with several threads
            x, y = x.index_select(0, order), y.index_select(0, order)
        return x, y

    def _map_targets(self, targets: torch.Tensor, label: Any) -> torch.Tensor:
        if self.target_transform is None:
            return targets
        if label is not None:  # a class dataset: every target is its label
            return torch.full(targets.shape, self.target_transform(label), dtype=torch.long)
        return torch.as_tensor([self.target_transform(t) for t in targets.tolist()])


class SubsetTask(Task):
    """The samples of a task at given indices (one split of a task).

    Unlike torchmeta's, it implements ``__getitems__``, which torch 2.x's
    ``DataLoader`` calls, so a split can be fed to a plain ``DataLoader``.

    Args:
        dataset: The task to take samples from.
        indices: Indices of the samples, in order.
        num_classes: Defaults to the parent task's ``num_classes``.
        target_transform: Applied to each target after the parent's transforms.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        indices: Sequence[int],
        num_classes: int | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if num_classes is None:
            num_classes = getattr(dataset, "num_classes", None)
        super().__init__(getattr(dataset, "index", None), num_classes, None, target_transform)
        self.dataset = dataset
        self.indices = indices if isinstance(indices, range) else [int(i) for i in indices]
        self._rng_key = getattr(dataset, "_rng_key", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[self.indices[index]]
        if self.target_transform is None:
            return sample
        return (*sample[:-1], self.target_transform(sample[-1]))

    def _stack(self, indices: Sequence[int]) -> Stacked | None:
        stack = getattr(self.dataset, "_stack", None)
        if stack is None or self.target_transform is not None:
            return None
        if isinstance(self.indices, range) and isinstance(indices, range):
            result: Stacked | None = stack(
                self.indices[indices.start : indices.stop : indices.step]
            )
        else:
            result = stack([self.indices[i] for i in indices])
        return result


class MetaDataset(Dataset[Any]):
    """Base class of meta-datasets: ``len()`` tasks, ``dataset[index]`` is a task.

    Randomness is reproducible and worker-safe: subclasses derive every random
    draw of task ``index`` from ``(seed, index, epoch)`` with the helpers of this
    class, never from global RNG state. ``MetaDataLoader`` advances the epoch
    each time it is iterated, so inputs that torchmeta redraws on every access
    are redrawn every epoch here, identically with any number of workers.

    Args:
        meta_train: Use the meta-train split (torchmeta's flag).
        meta_val: Use the meta-validation split.
        meta_test: Use the meta-test split.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        target_transform: Applied to targets (per task).
        dataset_transform: Applied to each task, e.g. a ``ClassSplitter``.
        seed: Seed of every random draw; ``None`` draws one from the OS once.

    Example:
        >>> from fastmeta.data import Sinusoid
        >>> dataset = Sinusoid(10, seed=0)
        >>> len(dataset), len(dataset[0])
        (1000000, 10)
    """

    def __init__(
        self,
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        split = resolve_meta_split(meta_train, meta_val, meta_test, meta_split)
        self.meta_train = split == "train"
        self.meta_val = split == "val"
        self.meta_test = split == "test"
        self.target_transform = target_transform
        self.dataset_transform = dataset_transform
        self._epoch = 0
        self._sample_rng: np.random.Generator | None = None
        self.seed(seed)

    @property
    def meta_split(self) -> str:
        """The split name: ``"train"``, ``"val"`` or ``"test"``."""
        return "train" if self.meta_train else "val" if self.meta_val else "test"

    def seed(self, seed: int | None = None) -> None:
        """Reseed the dataset (torchmeta's method); ``None`` draws a seed from the OS."""
        self._seed = _seeding.fresh_seed() if seed is None else _seeding.check_seed(seed)
        self._sample_rng = None

    def initial_seed(self) -> int:
        """Return the seed every task is derived from (drawn once if none was given)."""
        return self._seed

    @property
    def epoch(self) -> int:
        """The epoch that per-epoch draws (e.g. sine inputs) are keyed on."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Key per-epoch draws on ``epoch`` (``MetaDataLoader`` calls this each epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = epoch

    def _task_key(self, index: Any) -> tuple[int, ...]:
        key = _seeding.index_key(index)
        if key is None:
            raise TypeError(f"task index must be an int or a tuple of ints, got {index!r}")
        return (self._seed, self._epoch, *key)

    def sample_task(self) -> Any:
        """Return a random task (reproducible from the seed; for interactive use)."""
        if self._sample_rng is None:
            self._sample_rng = _seeding.make_rng(self._seed, _seeding.STREAM_SAMPLE_TASK)
        return self[int(self._sample_rng.integers(len(self)))]

    def __iter__(self) -> Iterator[Any]:
        for index in range(len(self)):
            yield self[index]

    def __getitems__(self, indices: Sequence[Any]) -> list[Any]:
        return [self[i] for i in indices]

    def _finish(self, task: Task) -> Any:
        """Stamp ``task`` with its random key and apply ``dataset_transform``."""
        task._rng_key = self._task_key(task.index)
        if self.dataset_transform is not None:
            return self.dataset_transform(task)
        return task

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__")

    def __getitem__(self, index: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")


class ClassDataset:
    """A dataset of classes: ``dataset[c]`` is a task holding every sample of class ``c``.

    ``num_classes`` counts the base classes; with class augmentations (e.g.
    ``[Rotation([90, 180, 270])]``) there are ``len(dataset) = num_classes *
    (1 + number of augmentations)`` classes, the augmented ones after the base ones.

    Args:
        meta_train: Use the meta-train split.
        meta_val: Use the meta-validation split.
        meta_test: Use the meta-test split.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        class_augmentations: A list of transforms, or of iterables of transforms
            (``Rotation([90, 180, 270])`` stands for three), each making new classes.
    """

    def __init__(
        self,
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        class_augmentations: Sequence[Any] | None = None,
    ) -> None:
        split = resolve_meta_split(meta_train, meta_val, meta_test, meta_split)
        self.meta_train = split == "train"
        self.meta_val = split == "val"
        self.meta_test = split == "test"
        self.class_augmentations = _flatten_augmentations(class_augmentations)

    @property
    def meta_split(self) -> str:
        """The split name: ``"train"``, ``"val"`` or ``"test"``."""
        return "train" if self.meta_train else "val" if self.meta_val else "test"

    @property
    def num_classes(self) -> int:
        """Number of base classes (before augmentation)."""
        raise NotImplementedError(f"{type(self).__name__} must implement num_classes")

    def get_class_augmentation(self, index: int) -> Callable[[Any], Any] | None:
        """Return the augmentation of class ``index``, or None for a base class."""
        position = index // self.num_classes - 1
        return None if position < 0 else self.class_augmentations[position]

    def class_sizes(self) -> list[int] | None:
        """Number of samples of each class, if known without loading them."""
        return None

    def describe_class(self, index: int) -> str:
        """A human-readable name of class ``index`` for error messages."""
        return f"class {index}"

    def __len__(self) -> int:
        return self.num_classes * (len(self.class_augmentations) + 1)

    def __getitem__(self, index: int) -> Task:
        raise NotImplementedError(f"{type(self).__name__} must implement __getitem__")


def _flatten_augmentations(augmentations: Sequence[Any] | None) -> list[Callable[[Any], Any]]:
    if augmentations is None:
        return []
    if not isinstance(augmentations, list | tuple):
        raise TypeError(
            "class_augmentations must be a list such as [Rotation([90, 180, 270])], "
            f"got {type(augmentations).__name__}"
        )
    flat: list[Callable[[Any], Any]] = []
    for item in augmentations:
        members = list(item) if isinstance(item, Iterable) else [item]
        for transform in members:
            if not callable(transform):
                raise TypeError(f"class augmentations must be callable, got {transform!r}")
            if transform in flat:
                raise ValueError(
                    f"class augmentation {transform!r} appears twice in class_augmentations; "
                    "each augmentation makes new classes once, remove the duplicate"
                )
            flat.append(transform)
    return flat


class CombinationMetaDataset(MetaDataset):
    """N-way tasks from every combination of ``num_classes_per_task`` classes.

    ``dataset[(c1, ..., cN)]`` concatenates classes ``c1 .. cN`` of a
    ``ClassDataset`` into one task, relabelled ``0 .. N-1`` by position (a fresh
    ``Categorical`` per task), then applies ``dataset_transform`` (usually a
    ``ClassSplitter``). ``MetaDataLoader`` draws the combinations at random.

    Args:
        dataset: The classes of one meta-split.
        num_classes_per_task: ``N`` of N-way.
        target_transform: Per-task target transform. ``None`` relabels to
            ``0 .. N-1`` (``Categorical(N)``); pass any other callable, e.g.
            ``int``, to keep the class ids instead.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        seed: Seed of the splits' sample choices; ``None`` draws one from the OS.

    Raises:
        TypeError: If ``num_classes_per_task`` is not an int.
        ValueError: If the split has fewer classes than ``num_classes_per_task``,
            or a class has fewer samples than the ``ClassSplitter`` takes.

    Example:
        >>> import torch
        >>> from fastmeta.data import ClassSplitter, LabelledClassDataset
        >>> points = torch.utils.data.TensorDataset(torch.randn(60, 2), torch.arange(60) % 6)
        >>> classes = LabelledClassDataset(points, meta_split="train", class_splits=(1, 0, 0))
        >>> tasks = CombinationMetaDataset(classes, 3,
        ...     dataset_transform=ClassSplitter(num_train_per_class=2, num_test_per_class=3))
        >>> len(tasks), len(tasks[(0, 4, 5)]["train"])
        (20, 6)
    """

    def __init__(
        self,
        dataset: ClassDataset,
        num_classes_per_task: int,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        *,
        seed: int | None = None,
    ) -> None:
        if isinstance(num_classes_per_task, bool) or not isinstance(num_classes_per_task, int):
            raise TypeError(
                f"num_classes_per_task must be an int (the N of N-way), "
                f"got {num_classes_per_task!r}"
            )
        if num_classes_per_task < 1:
            raise ValueError(f"num_classes_per_task must be >= 1, got {num_classes_per_task}")
        total = len(dataset)
        if num_classes_per_task > total:
            raise ValueError(
                f"num_classes_per_task={num_classes_per_task} but the meta-{dataset.meta_split} "
                f"split has only {total} classes; use at most {total}-way tasks or give this "
                "split more classes (class_splits=, class_augmentations=)"
            )
        self.dataset = dataset
        self.num_classes_per_task = num_classes_per_task
        super().__init__(
            meta_split=dataset.meta_split,
            target_transform=target_transform,
            dataset_transform=dataset_transform,
            seed=seed,
        )
        check = getattr(dataset_transform, "check_class_sizes", None)
        if check is not None:
            check(self.dataset)

    @property
    def num_tasks(self) -> int:
        """The exact number of class combinations (``len()`` caps it at ``sys.maxsize``)."""
        return math.comb(len(self.dataset), self.num_classes_per_task)

    def __len__(self) -> int:
        return min(self.num_tasks, sys.maxsize)

    def __iter__(self) -> Iterator[Any]:
        for index in itertools.combinations(range(len(self.dataset)), self.num_classes_per_task):
            yield self[index]

    def sample_task(self) -> Any:
        """Return the task of a random combination (reproducible from the seed)."""
        if self._sample_rng is None:
            self._sample_rng = _seeding.make_rng(self._seed, _seeding.STREAM_SAMPLE_TASK)
        classes = self._sample_rng.choice(
            len(self.dataset), size=self.num_classes_per_task, replace=False
        )
        return self[tuple(int(c) for c in classes)]

    def __getitem__(self, index: Any) -> Any:
        classes = self._check_index(index)
        tasks = [self.dataset[c] for c in classes]
        target_transform = self.target_transform
        if target_transform is None:
            target_transform = Categorical(self.num_classes_per_task)
        if isinstance(target_transform, Categorical):
            target_transform = target_transform.fresh()
            for task in tasks:  # label by position in the index, whatever the read order
                if hasattr(task, "label"):
                    target_transform(task.label)
        task = ConcatTask(tasks, self.num_classes_per_task, target_transform=target_transform)
        task.index = classes
        return self._finish(task)

    def _check_index(self, index: Any) -> tuple[int, ...]:
        n = self.num_classes_per_task
        example = tuple(range(n))
        if not isinstance(index, tuple | list):
            raise TypeError(
                f"a CombinationMetaDataset is indexed by a tuple of {n} class ids, "
                f"e.g. dataset[{example}], got {index!r}"
            )
        classes = tuple(int(c) for c in index)
        total = len(self.dataset)
        if len(classes) != n or len(set(classes)) != n:
            raise ValueError(f"index must hold {n} distinct class ids, got {index!r}")
        if any(not 0 <= c < total for c in classes):
            raise IndexError(f"class ids must be in [0, {total}), got {index!r}")
        return classes
