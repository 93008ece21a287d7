"""N-way K-shot tasks from a Hugging Face ``datasets.Dataset`` (text, audio, tabular, images).

``datasets`` is never imported here: any object with ``column_names``, ``__len__``,
column access ``dataset[name]`` and row access ``dataset[i]`` (a dict) works, so
``import fastmeta.data`` stays light. Sampling is :class:`FewShotDataset`'s: classes are
split once into disjoint meta-train/val/test sets by ``split_seed``, and the samples of
task ``i`` are a pure function of ``(seed, i)``, the same in every process and
data-loader worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from fastmeta.data._classification import (
    DEFAULT_CLASS_SPLITS,
    ClassSplits,
    FewShotDataset,
)
from fastmeta.data._splitters import ClassSplitter

RowTransform = Callable[[Mapping[str, Any]], Any]


class HFInputs(Dataset[Any]):
    """The inputs of a Hugging Face dataset, one per row: a column, or a function of the row.

    Args:
        dataset: a ``datasets.Dataset`` (or anything with ``column_names``, ``len`` and
            row access ``dataset[i]`` giving a dict).
        label_column: the column of class labels (ints or strings).
        input_column: the column holding each input; numbers and lists of numbers become
            tensors, other values (strings, dicts) are returned as they are.
        transform: ``transform(row) -> input`` instead of ``input_column``, e.g. a
            tokeniser call returning ``{"input_ids": ..., "attention_mask": ...}`` tensors.

    Attributes:
        labels: one label per row (the label column, read once).
        classes: the label names when the label column is a ``ClassLabel``, else ``None``.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        label_column: str = "label",
        input_column: str | None = None,
        transform: RowTransform | None = None,
    ) -> None:
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, Sequence) and not hasattr(dataset, "__len__"):
            raise TypeError(
                f"dataset must be a map-style datasets.Dataset with rows by index, got a "
                f"{type(dataset).__name__} (a streamed dataset); load it with "
                f"streaming=False, or keep some rows: Dataset.from_list(list(dataset.take(n)))"
            )
        if not isinstance(columns, Sequence) or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"dataset must be a Hugging Face datasets.Dataset (one split, with "
                f"column_names), got {type(dataset).__name__}; for a DatasetDict pick a split, "
                f"e.g. dataset['train']"
            )
        columns = list(columns)
        if label_column not in columns:
            raise ValueError(
                f"label_column={label_column!r} is not a column of the dataset; its columns "
                f"are {columns}"
            )
        if (input_column is None) == (transform is None):
            raise ValueError(
                f"give exactly one of input_column (one of {columns}) or transform "
                f"(a function of the row), got input_column={input_column!r} and "
                f"transform={transform!r}"
            )
        if input_column is not None and input_column not in columns:
            raise ValueError(
                f"input_column={input_column!r} is not a column of the dataset; its columns "
                f"are {columns}"
            )
        if transform is not None and not callable(transform):
            raise TypeError(
                f"transform must be a function of one row (a dict of columns), got "
                f"{type(transform).__name__}"
            )
        self.dataset = dataset
        self.label_column = label_column
        self.input_column = input_column
        self.transform = transform
        self.labels: list[Any] = list(dataset[label_column])
        feature = getattr(dataset, "features", {}).get(label_column)
        names = getattr(feature, "names", None)
        self.classes: list[str] | None = list(names) if names is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Any:
        if self.input_column is not None:
            return _as_tensor(self.dataset[int(index)][self.input_column])
        assert self.transform is not None  # checked in __init__
        return self.transform(self.dataset[int(index)])


def _as_tensor(value: Any) -> Any:
    """Numbers and (nested) lists of numbers as a tensor; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return value


class HFFewShotDataset(FewShotDataset):
    """N-way tasks over the classes of a Hugging Face ``datasets.Dataset``.

    A :class:`FewShotDataset` whose samples are the dataset's rows: the classes (values
    of ``label_column``) are split into disjoint meta-train/val/test sets, and each task
    is ``num_classes_per_task`` classes of this split, relabelled ``0 .. N-1``. With
    ``dataset_transform=ClassSplitter(...)`` each task has support and query sets; see
    :func:`hf_few_shot` for the usual N-way K-shot setting in one call.

    Args:
        dataset: a ``datasets.Dataset`` (one split).
        num_classes_per_task: ``N`` of N-way.
        label_column: the column of class labels.
        input_column: the column of inputs (numbers or lists of numbers become tensors).
        transform: ``transform(row) -> input`` instead of ``input_column``.
        meta_split: ``"train"``, ``"val"`` or ``"test"``: whose classes tasks use.
        class_splits: ``(train, val, test)`` fractions of the classes, or a mapping from
            split name to labels.
        split_seed: seed of the class split; keep it equal across the three splits.
        seed: seed of the per-task sample choices; ``None`` draws one from the OS.
        dataset_transform: applied to each task, e.g. ``ClassSplitter(...)``.
        target_transform: per-task target transform; ``None`` relabels ``0 .. N-1``.

    Raises:
        TypeError: ``dataset`` is not a ``datasets.Dataset``.
        ValueError: an unknown column, both or neither of ``input_column`` and
            ``transform``, or a split with fewer than ``num_classes_per_task`` classes.
    """

    def __init__(
        self,
        dataset: Any,
        num_classes_per_task: int,
        *,
        label_column: str = "label",
        input_column: str | None = None,
        transform: RowTransform | None = None,
        meta_split: str = "train",
        class_splits: ClassSplits = DEFAULT_CLASS_SPLITS,
        split_seed: int = 0,
        seed: int | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
    ) -> None:
        inputs = HFInputs(dataset, label_column=label_column, input_column=input_column,
                          transform=transform)
        super().__init__(
            inputs, num_classes_per_task, meta_split=meta_split,
            target_transform=target_transform, dataset_transform=dataset_transform,
            labels=inputs.labels, class_splits=class_splits, split_seed=split_seed, seed=seed,
        )


def hf_few_shot(
    dataset: Any,
    ways: int,
    shots: int,
    *,
    test_shots: int | None = None,
    label_column: str = "label",
    input_column: str | None = None,
    transform: RowTransform | None = None,
    meta_split: str = "train",
    class_splits: ClassSplits = DEFAULT_CLASS_SPLITS,
    split_seed: int = 0,
    seed: int | None = None,
) -> HFFewShotDataset:
    """N-way K-shot tasks from a Hugging Face dataset, ready for ``BatchMetaDataLoader``.

    Each task draws ``ways`` classes of ``meta_split`` and, per class, ``shots`` support
    (``"train"``) and ``test_shots`` query (``"test"``) rows; targets are ``0 .. ways-1``.

    Args:
        dataset: a ``datasets.Dataset`` (one split).
        ways: classes per task (N).
        shots: support examples per class (K).
        test_shots: query examples per class (default: ``shots``).
        label_column, input_column, transform, meta_split, class_splits, split_seed, seed:
            as for :class:`HFFewShotDataset`.

    Example:
        >>> from datasets import Dataset
        >>> rows = Dataset.from_dict({"x": [[float(i)] * 3 for i in range(60)],
        ...                           "label": [i % 10 for i in range(60)]})
        >>> tasks = hf_few_shot(rows, ways=3, shots=2, test_shots=2, input_column="x",
        ...                     class_splits=(0.6, 0.2, 0.2), seed=0)
        >>> batch = next(iter(BatchMetaDataLoader(tasks, batch_size=4)))
        >>> batch["train"][0].shape, batch["test"][1].shape
        (torch.Size([4, 6, 3]), torch.Size([4, 6]))
    """
    test_shots = shots if test_shots is None else test_shots
    splitter = ClassSplitter(shuffle=True, num_train_per_class=shots,
                             num_test_per_class=test_shots)
    return HFFewShotDataset(
        dataset, ways, label_column=label_column, input_column=input_column,
        transform=transform, meta_split=meta_split, class_splits=class_splits,
        split_seed=split_seed, seed=seed, dataset_transform=splitter,
    )
