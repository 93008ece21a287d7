"""``ClassSplitter``: split each task into train/test (or support/query) samples per class."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastmeta.data import _seeding
from fastmeta.data._protocol import ConcatTask, SubsetTask


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


class ClassSplitter:
    """Split every task into ``"train"``/``"test"`` (or ``"support"``/``"query"``) subsets.

    Each class of a task gives ``num_train_per_class`` samples to the first
    split and ``num_test_per_class`` others to the second (for a regression
    task, all samples form one class). Which samples are taken is random when
    ``shuffle`` is true, drawn from ``(random_state_seed, dataset seed, task
    index, epoch)``: reproducible, different for every task and epoch (torchmeta
    took the same samples of a class every time). Tasks that fix their support
    points (``Sinusoid`` with ``support_range`` or ``query_grid``) are split in
    order, and so are fastmeta's toy regression tasks, whose samples are
    independent draws already.

    Use it as a meta-dataset's ``dataset_transform``, or torchmeta-style as
    ``ClassSplitter(dataset, ...)``, which returns a copy of ``dataset`` with
    this splitter as its ``dataset_transform`` (``ClassSplitter(task, ...)``
    returns the split task).

    Args:
        dataset: Optional meta-dataset or task to apply the splitter to at once.
        shuffle: Pick random samples of each class; otherwise the first ones.
        num_samples_per_class: Mapping from split name to samples per class,
            instead of the four arguments below.
        num_train_per_class: Samples per class in ``"train"`` (the K of K-shot).
        num_test_per_class: Samples per class in ``"test"``.
        num_support_per_class: Same as ``num_train_per_class``, key ``"support"``.
        num_query_per_class: Same as ``num_test_per_class``, key ``"query"``.
        random_state_seed: Extra seed mixed into the sample choices.

    Raises:
        ValueError: If no split is given, a count is below 1, or both a
            torchmeta name and its alias are given.

    Example:
        >>> from fastmeta.data import Sinusoid
        >>> splitter = ClassSplitter(num_train_per_class=5, num_test_per_class=15)
        >>> task = Sinusoid(20, dataset_transform=splitter, seed=0)[3]
        >>> list(task), len(task["train"]), len(task["test"])
        (['train', 'test'], 5, 15)
    """

    def __new__(cls, dataset: Any = None, **kwargs: Any) -> Any:
        splitter = super().__new__(cls)
        if dataset is None:
            return splitter  # Python now calls __init__ with the same arguments
        splitter._configure(**kwargs)
        return splitter.apply(dataset)  # not a ClassSplitter, so __init__ is skipped

    def __init__(
        self,
        dataset: Any = None,
        *,
        shuffle: bool = True,
        num_samples_per_class: Mapping[str, int] | None = None,
        num_train_per_class: int | None = None,
        num_test_per_class: int | None = None,
        num_support_per_class: int | None = None,
        num_query_per_class: int | None = None,
        random_state_seed: int = 0,
    ) -> None:
        self._configure(
            shuffle=shuffle,
            num_samples_per_class=num_samples_per_class,
            num_train_per_class=num_train_per_class,
            num_test_per_class=num_test_per_class,
            num_support_per_class=num_support_per_class,
            num_query_per_class=num_query_per_class,
            random_state_seed=random_state_seed,
        )

    def _configure(
        self,
        *,
        shuffle: bool = True,
        num_samples_per_class: Mapping[str, int] | None = None,
        num_train_per_class: int | None = None,
        num_test_per_class: int | None = None,
        num_support_per_class: int | None = None,
        num_query_per_class: int | None = None,
        random_state_seed: int = 0,
    ) -> None:
        splits: OrderedDict[str, int] = OrderedDict()
        if num_samples_per_class is not None:
            aliases = (num_train_per_class, num_test_per_class)
            if any(v is not None for v in (*aliases, num_support_per_class, num_query_per_class)):
                raise ValueError(
                    "pass either num_samples_per_class or the num_*_per_class arguments, not both"
                )
            for key, count in num_samples_per_class.items():
                splits[str(key)] = _count(f"num_samples_per_class[{key!r}]", count)
        else:
            pairs = (
                ("train", "support", num_train_per_class, num_support_per_class),
                ("test", "query", num_test_per_class, num_query_per_class),
            )
            for name, alias, value, alias_value in pairs:
                if value is not None and alias_value is not None:
                    raise ValueError(
                        f"num_{name}_per_class={value!r} and num_{alias}_per_class="
                        f"{alias_value!r} name the same split; pass only one of them"
                    )
                if value is not None:
                    splits[name] = _count(f"num_{name}_per_class", value)
                elif alias_value is not None:
                    splits[alias] = _count(f"num_{alias}_per_class", alias_value)
        if not splits:
            raise ValueError(
                "ClassSplitter needs the samples per class of each split, e.g. "
                "ClassSplitter(num_train_per_class=5, num_test_per_class=15)"
            )
        self.shuffle = bool(shuffle)
        self.splits = splits
        self.random_state_seed = _seeding.check_seed(random_state_seed, "random_state_seed")

    @property
    def min_samples_per_class(self) -> int:
        """Samples each class must have: the sum over splits."""
        return sum(self.splits.values())

    def seed(self, seed: int) -> None:
        """Set ``random_state_seed`` (torchmeta's method)."""
        self.random_state_seed = _seeding.check_seed(seed)

    def apply(self, dataset: Any) -> Any:
        """Split a task, or return a copy of a meta-dataset that splits its tasks.

        A meta-dataset that already has a ``dataset_transform`` keeps it: the
        copy applies it first, then this splitter.
        """
        if hasattr(dataset, "dataset_transform"):
            result = copy.copy(dataset)
            previous = dataset.dataset_transform
            result.dataset_transform = self if previous is None else _Chain(previous, self)
            check = getattr(result, "dataset", None)
            if check is not None and hasattr(check, "class_sizes"):
                self.check_class_sizes(check)
            return result
        return self(dataset)

    def check_class_sizes(self, classes: Any) -> None:
        """Raise early if a class of a ``ClassDataset`` has too few samples for the splits."""
        sizes = classes.class_sizes()
        if not sizes:
            return
        need = self.min_samples_per_class
        smallest = int(np.argmin(sizes))
        if sizes[smallest] < need:
            raise ValueError(
                f"{classes.describe_class(smallest)} of the meta-{classes.meta_split} split has "
                f"{sizes[smallest]} samples, but {self!r} takes {need} per class; lower the "
                f"shots or give every class at least {need} samples"
            )

    def __call__(self, task: Any) -> OrderedDict[str, SubsetTask]:
        if isinstance(task, Mapping):
            raise TypeError(
                f"ClassSplitter got a task that is already split into {list(task)}; "
                "apply one splitter only"
            )
        fixed_support = getattr(task, "num_support", None)
        if fixed_support is not None:
            return self._split_in_order(task, fixed_support)
        groups = self._class_groups(task)
        # Samples of fastmeta's toy tasks are independent draws: any subset is as random.
        shuffle = self.shuffle and not getattr(task, "_iid_samples", False)
        stream = self._stream(task) if shuffle else None
        need = self.min_samples_per_class
        if stream is None and len(groups) == 1 and len(groups[0][1]) >= need:
            return self._consecutive(task)  # one class taken in order: plain ranges
        indices: dict[str, list[int]] = {name: [] for name in self.splits}
        for position, (name, members) in enumerate(groups):
            if len(members) < need:
                raise ValueError(self._too_few_message(task, name, len(members)))
            chosen = (
                range(need)
                if stream is None  # each class of a task draws its own permutation
                else _seeding.permutation(_seeding.hash_key(stream, position), len(members))
            )
            start = 0
            for split, count in self.splits.items():
                indices[split].extend(members[i] for i in chosen[start : start + count])
                start += count
        return OrderedDict((split, SubsetTask(task, indices[split])) for split in self.splits)

    def _consecutive(self, task: Any) -> OrderedDict[str, SubsetTask]:
        splits: OrderedDict[str, SubsetTask] = OrderedDict()
        start = 0
        for split, count in self.splits.items():
            splits[split] = SubsetTask(task, range(start, start + count))
            start += count
        return splits

    def _stream(self, task: Any) -> int:
        key = getattr(task, "_rng_key", None)
        if key is None:
            key = _seeding.index_key(getattr(task, "index", None)) or ()
        return _seeding.hash_key(self.random_state_seed, _seeding.STREAM_SPLIT, *key)

    def _class_groups(self, task: Any) -> list[tuple[Any, Sequence[int]]]:
        num_classes = getattr(task, "num_classes", None)
        if num_classes is None:  # regression: every sample is one class
            return [("all", range(len(task)))]
        if isinstance(task, ConcatTask):
            groups: list[tuple[Any, Sequence[int]]] = []
            start = 0
            for position, end in enumerate(task.cumulative_sizes):
                name = getattr(task.datasets[position], "label", position)
                groups.append((name, range(start, end)))
                start = end
            return groups
        by_label: dict[Any, list[int]] = {}
        for i in range(len(task)):
            sample = task[i]
            if not isinstance(sample, tuple | list) or len(sample) < 2:
                raise TypeError(
                    "ClassSplitter reads each sample's target to group classes: samples must be "
                    f"(input, target) pairs, got {type(sample).__name__}"
                )
            target = sample[-1]
            key = target.item() if hasattr(target, "item") else target
            by_label.setdefault(key, []).append(i)
        if len(by_label) != num_classes:
            raise ValueError(
                f"task {task.index!r} declares num_classes={num_classes} but its samples have "
                f"{len(by_label)} distinct targets"
            )
        return list(by_label.items())

    def _split_in_order(self, task: Any, num_support: int) -> OrderedDict[str, SubsetTask]:
        counts = list(self.splits.values())
        num_query = len(task) - num_support
        if counts != [num_support, num_query]:
            raise ValueError(
                f"task {task.index!r} fixes its layout ({num_support} support points, then "
                f"{num_query} query points) but {self!r} asks for {counts}; build the dataset "
                "with matching num_support and num_samples_per_task (the sinusoid() helper does)"
            )
        return self._consecutive(task)

    def _too_few_message(self, task: Any, name: Any, available: int) -> str:
        need = self.min_samples_per_class
        wanted = " + ".join(f"{count} {split}" for split, count in self.splits.items())
        if getattr(task, "num_classes", None) is None:
            return (
                f"task {task.index!r} has {available} samples but {self!r} takes {need} "
                f"({wanted}); give the dataset num_samples_per_task >= {need} or lower the shots"
            )
        return (
            f"class {name!r} of task {task.index!r} has {available} samples but {self!r} takes "
            f"{need} per class ({wanted}); lower the shots or use classes with more samples"
        )

    def __repr__(self) -> str:
        counts = ", ".join(f"num_{name}_per_class={count}" for name, count in self.splits.items())
        return f"ClassSplitter(shuffle={self.shuffle}, {counts})"


class _Chain:
    """Apply two dataset transforms in order."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first = first
        self.second = second

    def __call__(self, task: Any) -> Any:
        return self.second(self.first(task))

    def __repr__(self) -> str:
        return f"{self.first!r} then {self.second!r}"
