"""torchmeta's protocol: splitter, relabelling, collation and loaders, incl. foreign datasets."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from fastmeta.data import (
    BatchMetaCollate,
    BatchMetaDataLoader,
    Categorical,
    ClassSplitter,
    CombinationMetaDataset,
    LabelledClassDataset,
    MetaDataLoader,
    Rotation,
    Sinusoid,
    SubsetTask,
    Task,
    sinusoid,
)


class ArrayTask(Task):
    """A plain user task of numpy samples, without fastmeta's fast path."""

    def __init__(self, index: int, size: int) -> None:
        super().__init__(index, None)
        self.x = np.arange(size, dtype=np.float64).reshape(size, 1) + 100 * index
        self.y = 2 * self.x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[i], self.y[i]


class TorchmetaStyleDataset:
    """What torchmeta users write: __len__ and __getitem__ returning an OrderedDict of splits."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> OrderedDict[str, TensorDataset]:
        x = torch.full((7, 3), float(index))
        y = torch.arange(7)
        return OrderedDict(
            [("train", TensorDataset(x[:3], y[:3])), ("test", TensorDataset(x[3:], y[3:]))]
        )


def test_splitter_keys_sizes_and_disjoint_indices() -> None:
    task = ArrayTask(0, 20)
    split = ClassSplitter(num_train_per_class=5, num_test_per_class=15)(task)
    assert list(split) == ["train", "test"]
    assert isinstance(split["train"], SubsetTask)
    assert (len(split["train"]), len(split["test"])) == (5, 15)
    assert not set(split["train"].indices) & set(split["test"].indices)
    aliases = ClassSplitter(num_support_per_class=2, num_query_per_class=3)(task)
    assert list(aliases) == ["support", "query"]


def test_splitter_shuffle_is_seeded_by_task_index_and_seed() -> None:
    splitter = ClassSplitter(num_train_per_class=3, num_test_per_class=3)
    first = splitter(ArrayTask(0, 30))["train"].indices
    assert first == splitter(ArrayTask(0, 30))["train"].indices
    assert first != splitter(ArrayTask(1, 30))["train"].indices
    in_order = ClassSplitter(shuffle=False, num_train_per_class=3, num_test_per_class=3)
    assert list(in_order(ArrayTask(0, 30))["train"].indices) == [0, 1, 2]


def test_splitter_on_meta_dataset_returns_a_split_copy() -> None:
    dataset = Sinusoid(20, seed=0)
    split = ClassSplitter(dataset, shuffle=True, num_train_per_class=5, num_test_per_class=15)
    assert isinstance(split, Sinusoid) and dataset.dataset_transform is None
    assert list(split[0]) == ["train", "test"]
    assert isinstance(ClassSplitter(ArrayTask(0, 4), num_train_per_class=2), OrderedDict)


def test_subset_task_implements_getitems_for_plain_dataloader() -> None:
    support = sinusoid(5, test_shots=7, seed=0)[3]["test"]
    assert len(support.__getitems__([0, 1])) == 2
    inputs, targets = next(iter(DataLoader(support, batch_size=7)))
    assert inputs.shape == (7, 1) and targets.shape == (7, 1)


def test_categorical_relabels_by_first_appearance() -> None:
    relabel = Categorical(num_classes=3)
    assert [relabel(c) for c in ["b", "a", "b", "c"]] == [0, 1, 0, 2]
    with pytest.raises(ValueError, match=r"Categorical\(num_classes=3\) saw a new label"):
        relabel("d")
    unbounded = Categorical()
    assert [unbounded(torch.tensor(7)), unbounded(7), unbounded(np.int64(3))] == [0, 0, 1]


def test_rotation_matches_rot90_and_rejects_other_angles() -> None:
    image = torch.arange(6.0).reshape(1, 2, 3)
    assert torch.equal(Rotation(90)(image), torch.rot90(image, 1, dims=(-2, -1)))
    assert torch.equal(Rotation(360)(image), image)
    assert [r.angle for r in Rotation([90, 180, 270])] == [90, 180, 270]
    with pytest.raises(ValueError, match="angle must be a multiple of 90 degrees.*got 45"):
        Rotation(45)


def test_collate_fast_path_equals_per_sample_path() -> None:
    fast = sinusoid(4, test_shots=6, seed=1)
    slow = sinusoid(4, test_shots=6, seed=1, transform=torch.clone)  # a transform: per sample
    collate = BatchMetaCollate()
    a, b = collate([fast[i] for i in range(3)]), collate([slow[i] for i in range(3)])
    for key in ("train", "test"):
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1])


def test_torchmeta_style_user_dataset_works_with_both_loaders() -> None:
    batch = next(iter(BatchMetaDataLoader(TorchmetaStyleDataset(), batch_size=4)))
    assert isinstance(batch, OrderedDict) and list(batch) == ["train", "test"]
    assert batch["train"][0].shape == (4, 3, 3) and batch["test"][1].shape == (4, 4)
    tasks = next(iter(MetaDataLoader(TorchmetaStyleDataset(), batch_size=3)))
    assert isinstance(tasks, list) and len(tasks) == 3 and list(tasks[0]) == ["train", "test"]


def test_unsplit_numpy_tasks_collate_to_a_pair_of_tensors() -> None:
    class Tasks:
        def __len__(self) -> int:
            return 5

        def __getitem__(self, index: int) -> ArrayTask:
            return ArrayTask(index, 4)

    inputs, targets = next(iter(BatchMetaDataLoader(Tasks(), batch_size=5, shuffle=False)))
    assert inputs.shape == (5, 4, 1) and inputs.dtype == torch.float64
    assert torch.equal(targets, 2 * inputs)


def test_meta_data_loader_returns_lists_of_tasks() -> None:
    tasks = next(iter(MetaDataLoader(sinusoid(5, seed=0), batch_size=4)))
    assert isinstance(tasks, list) and len(tasks) == 4
    assert all(list(task) == ["train", "test"] for task in tasks)


def test_torch_subset_of_meta_dataset_uses_getitems() -> None:
    subset = Subset(sinusoid(3, seed=0), range(10))
    batch = next(iter(BatchMetaDataLoader(subset, batch_size=10, shuffle=False)))
    assert batch["train"][0].shape == (10, 3, 1)


def test_combination_meta_dataset_indexing_and_length() -> None:
    data = TensorDataset(torch.randn(60, 2), torch.arange(60) % 6)
    classes = LabelledClassDataset(data, meta_split="train", class_splits=(1, 0, 0))
    tasks = CombinationMetaDataset(classes, 3, seed=0)
    assert len(tasks) == tasks.num_tasks == 20
    task = tasks[(5, 0, 2)]
    assert [task[i][1] for i in range(0, 30, 10)] == [0, 1, 2]  # labels by position
    with pytest.raises(TypeError, match="indexed by a tuple of 3 class ids"):
        tasks[0]
    with pytest.raises(ValueError, match="3 distinct class ids"):
        tasks[(1, 1, 2)]


def test_splitter_errors_name_argument_and_fix() -> None:
    with pytest.raises(ValueError, match=r"ClassSplitter needs the samples per class"):
        ClassSplitter()
    with pytest.raises(ValueError, match="num_train_per_class=5 and num_support_per_class=5"):
        ClassSplitter(num_train_per_class=5, num_support_per_class=5)
    with pytest.raises(ValueError, match="num_test_per_class must be >= 1, got 0"):
        ClassSplitter(num_train_per_class=1, num_test_per_class=0)
    too_many = ClassSplitter(num_train_per_class=5, num_test_per_class=5)
    with pytest.raises(ValueError, match=r"has 6 samples but .* takes 10 .*num_samples_per_task"):
        too_many(ArrayTask(0, 6))
    with pytest.raises(TypeError, match="already split"):
        too_many(too_many(ArrayTask(0, 20)))


def test_ragged_batch_error_points_to_meta_data_loader() -> None:
    tasks = [ArrayTask(0, 3), ArrayTask(1, 4)]
    with pytest.raises(ValueError, match="need the same shots.*MetaDataLoader"):
        BatchMetaCollate()(tasks)


def test_splitter_draws_each_class_independently() -> None:
    data = TensorDataset(torch.arange(40.0).reshape(40, 1), torch.arange(40) // 20)
    classes = LabelledClassDataset(data, meta_split="train", class_splits=(1, 0, 0))
    splitter = ClassSplitter(num_train_per_class=5, num_test_per_class=5)
    tasks = CombinationMetaDataset(classes, 2, dataset_transform=splitter, seed=0)
    support = tasks[(0, 1)]["train"].indices
    first, second = support[:5], [i - 20 for i in support[5:]]
    assert sorted(first) != sorted(second)  # not the same positions in both classes
