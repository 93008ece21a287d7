"""Few-shot classification: labelled datasets, image folders, Digits; splits, labels, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from fastmeta.data import (
    BatchMetaDataLoader,
    ClassSplitter,
    FewShotDataset,
    FewShotImageFolder,
    ImageFolderDataset,
    MetaDataLoader,
    Rotation,
)


def _points(num_classes: int = 10, per_class: int = 20, features: int = 4) -> TensorDataset:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), features, generator=torch.Generator().manual_seed(0))
    inputs = noise + labels[:, None].float()
    return TensorDataset(inputs, labels)


def _splitter(shots: int = 2, queries: int = 3) -> ClassSplitter:
    return ClassSplitter(num_train_per_class=shots, num_test_per_class=queries)


def _write_images(root: Path, classes: dict[str, int], size: int = 6) -> None:
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True)
        for k in range(count):
            pixels = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            image_module.fromarray(pixels).save(folder / f"{k:02d}.png")


def test_classification_batch_layout_and_relabelling() -> None:
    tasks = FewShotDataset(_points(), 5, meta_split="train", dataset_transform=_splitter(), seed=0)
    batch = next(iter(BatchMetaDataLoader(tasks, batch_size=3)))
    assert list(batch) == ["train", "test"]
    assert batch["train"][0].shape == (3, 10, 4) and batch["train"][0].dtype == torch.float32
    assert batch["test"][1].shape == (3, 15) and batch["test"][1].dtype == torch.int64
    for labels, count in ((batch["train"][1], 2), (batch["test"][1], 3)):
        for row in labels:
            assert torch.equal(row.bincount(minlength=5), torch.full((5,), count))


def test_meta_splits_are_class_disjoint_and_cover_all_classes() -> None:
    data = _points(num_classes=30, per_class=5)
    splits = {
        name: FewShotDataset(data, 3, meta_split=name, seed=0).dataset.labels
        for name in ("train", "val", "test")
    }
    assert [len(v) for v in splits.values()] == [18, 6, 6]
    assert not set(splits["train"]) & set(splits["val"])
    assert not set(splits["train"]) & set(splits["test"])
    assert not set(splits["val"]) & set(splits["test"])
    assert set().union(*splits.values()) == set(range(30))
    explicit = FewShotDataset(data, 2, meta_test=True, class_splits={"test": [1, 2]}, seed=0)
    assert explicit.dataset.labels == [1, 2]


def test_tasks_draw_only_classes_of_their_split() -> None:
    data = _points(num_classes=12, per_class=6)
    tasks = FewShotDataset(data, 2, meta_split="val", dataset_transform=_splitter(1, 1), seed=0)
    val_labels = set(tasks.dataset.labels)
    for task in next(iter(MetaDataLoader(tasks, batch_size=8))):
        for class_task in task["train"].dataset.datasets:
            assert tasks.dataset.labels[class_task.label] in val_labels


def test_rotation_augmentation_adds_rotated_classes_in_the_same_split() -> None:
    images = TensorDataset(torch.rand(40, 1, 5, 5), torch.arange(40) % 4)
    tasks = FewShotDataset(
        images,
        3,
        meta_split="train",
        class_splits=(1, 0, 0),
        class_augmentations=[Rotation([90, 180, 270])],
        seed=0,
    )
    classes = tasks.dataset
    assert classes.num_classes == 4 and len(classes) == 16
    base, quarter = classes[1], classes[1 + 4]
    assert torch.equal(quarter[0][0], torch.rot90(base[0][0], 1, dims=(-2, -1)))
    assert "Rotation(90)" in classes.describe_class(5)


def test_fast_and_per_sample_paths_agree() -> None:
    images = TensorDataset(torch.rand(60, 1, 4, 4), torch.arange(60) % 6)
    kwargs = {
        "meta_split": "train",
        "class_splits": (1, 0, 0),
        "class_augmentations": [Rotation([90])],
        "dataset_transform": _splitter(),
        "seed": 3,
    }
    fast = FewShotDataset(images, 4, **kwargs)
    slow = FewShotDataset(images, 4, transform=torch.clone, **kwargs)
    index = (7, 0, 11, 3)
    a = next(iter(BatchMetaDataLoader(fast, sampler=[index], batch_size=1)))
    b = next(iter(BatchMetaDataLoader(slow, sampler=[index], batch_size=1)))
    for key in ("train", "test"):
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1])


def test_class_tasks_reproducible_with_workers_and_from_seed() -> None:
    def run(workers: int, seed: int) -> list[torch.Tensor]:
        tasks = FewShotDataset(
            _points(), 3, meta_split="train", dataset_transform=_splitter(), seed=seed
        )
        loader = BatchMetaDataLoader(tasks, batch_size=2, num_workers=workers)
        return [b["train"][0] for b, _ in zip(loader, range(4), strict=False)]

    single, parallel, other = run(0, 5), run(2, 5), run(0, 6)
    assert all(torch.equal(x, y) for x, y in zip(single, parallel, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(single, other, strict=True))


def test_image_folder_omniglot_layout_through_the_pipeline(tmp_path: Path) -> None:
    classes = {f"alphabet{a}/character{c}": 4 for a in range(3) for c in range(4)}
    _write_images(tmp_path, classes)
    train = FewShotImageFolder(
        tmp_path,
        3,
        meta_train=True,
        dataset_transform=_splitter(1, 2),
        class_augmentations=[Rotation([90, 180, 270])],
        seed=0,
    )
    test = FewShotImageFolder(tmp_path, 2, meta_test=True, seed=0)
    assert set(train.dataset.dataset.classes) == set(classes)
    train_names = {train.dataset.dataset.classes[i] for i in train.dataset.labels}
    test_names = {test.dataset.dataset.classes[i] for i in test.dataset.labels}
    assert len(train_names) == 8 and len(test_names) == 2 and not train_names & test_names
    batch = next(iter(BatchMetaDataLoader(train, batch_size=2)))
    assert batch["train"][0].shape == (2, 3, 1, 6, 6) and batch["test"][1].shape == (2, 6)
    assert batch["train"][0].min() >= 0.0 and batch["train"][0].max() <= 1.0


def test_image_folder_flat_layout_and_resize(tmp_path: Path) -> None:
    _write_images(tmp_path, {f"class{c}": 3 for c in range(5)}, size=10)
    tasks = FewShotImageFolder(
        tmp_path,
        5,
        meta_split="train",
        class_splits=(1, 0, 0),
        image_size=(4, 7),
        dtype=torch.float64,
        dataset_transform=_splitter(1, 1),
        seed=0,
    )
    batch = next(iter(BatchMetaDataLoader(tasks, batch_size=1)))
    assert batch["test"][0].shape == (1, 5, 1, 4, 7) and batch["test"][0].dtype == torch.float64
    with pytest.raises(ValueError, match="mode must be 'L' .* or 'RGB', got 'CMYK'"):
        FewShotImageFolder(tmp_path, 2, meta_split="train", mode="CMYK")


def test_image_folder_with_too_few_images_per_class(tmp_path: Path) -> None:
    _write_images(tmp_path, {"a/x": 5, "a/y": 2, "b/z": 5})
    with pytest.raises(ValueError, match=r"class 'a/y' \(folder .*a/y\) .* has 2 samples.*takes 3"):
        FewShotImageFolder(
            tmp_path,
            2,
            meta_split="train",
            class_splits=(1, 0, 0),
            dataset_transform=_splitter(1, 2),
        )


def test_image_folder_without_images(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="no .png images found under"):
        FewShotImageFolder(tmp_path, 2, meta_split="train")


def test_image_folder_refuses_an_empty_class_folder_instead_of_shifting_classes(
    tmp_path: Path,
) -> None:
    _write_images(tmp_path, {"a/x": 3, "b/z": 3, "c": 3})
    (tmp_path / "a" / "y").mkdir()  # an empty character folder between x and z
    with pytest.raises(ValueError, match=r"class folder '.*a/y' holds no .png images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a" / "y").rmdir()
    (tmp_path / "b2").mkdir()  # an empty class of the flat layout
    with pytest.raises(ValueError, match=r"class folder '.*b2' holds no .png images"):
        FewShotImageFolder(tmp_path, 2, meta_split="train")


def _corrupt_folder(root: Path) -> Path:
    _write_images(root, {"a": 3, "b": 3})
    bad = root / "b" / "01.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated: the header survives, the pixels do not
    return bad


def test_image_folder_names_a_corrupt_image_when_it_is_read(tmp_path: Path) -> None:
    bad = _corrupt_folder(tmp_path)
    images = ImageFolderDataset(tmp_path)  # lazy: construction does not decode
    index = [str(path) for path, _ in images.samples].index(str(bad))
    with pytest.raises(OSError, match=r"cannot read image '.*b/01.png' \(class 'b'\)"):
        images[index]


def test_image_folder_verify_decodes_every_image_at_construction(tmp_path: Path) -> None:
    _corrupt_folder(tmp_path)
    with pytest.raises(OSError, match=r"cannot read image '.*b/01.png'.*verify=True"):
        ImageFolderDataset(tmp_path, verify=True)
    with pytest.raises(OSError, match=r"cannot read image '.*b/01.png'"):
        FewShotImageFolder(tmp_path, 2, meta_split="train", verify=True)
    (tmp_path / "b" / "01.png").unlink()
    assert len(ImageFolderDataset(tmp_path, verify=True)) == 5


def test_more_ways_than_classes_in_split() -> None:
    with pytest.raises(
        ValueError, match="num_classes_per_task=5 but the meta-val split has only 2"
    ):
        FewShotDataset(_points(num_classes=10), 5, meta_split="val")


def test_more_shots_than_samples() -> None:
    with pytest.raises(ValueError, match="has 8 samples, but .* takes 15 per class"):
        FewShotDataset(
            _points(per_class=8), 2, meta_split="train", dataset_transform=_splitter(5, 10)
        )


def test_dataset_without_labels() -> None:
    unlabelled = TensorDataset(torch.randn(20, 3))
    with pytest.raises(TypeError, match="needs a labelled dataset.*pass labels="):
        FewShotDataset(unlabelled, 2, meta_split="train")
    labelled = FewShotDataset(
        [torch.randn(3) for _ in range(20)],
        2,
        meta_split="train",
        labels=[i % 4 for i in range(20)],
        class_splits=(1, 0, 0),
        seed=0,
    )
    assert labelled[(0, 1)][0][0].shape == (3,)


def test_meta_split_must_be_chosen() -> None:
    with pytest.raises(ValueError, match="meta-split is undefined: pass meta_split='train'"):
        FewShotDataset(_points(), 2)
    with pytest.raises(ValueError, match="choose one meta-split"):
        FewShotDataset(_points(), 2, meta_train=True, meta_test=True)


def test_digits_benchmark_offline() -> None:
    pytest.importorskip("sklearn")
    from fastmeta.data import Digits

    splits = {name: Digits(5, meta_split=name, seed=0) for name in ("train", "val", "test")}
    digits = [set(s.dataset.labels) for s in splits.values()]
    assert [len(d) for d in digits] == [6, 2, 2] and set().union(*digits) == set(range(10))
    assert [len(s.dataset) for s in splits.values()] == [24, 8, 8]
    tasks = Digits(5, meta_split="test", dataset_transform=_splitter(1, 5), seed=0)
    batch = next(iter(BatchMetaDataLoader(tasks, batch_size=4)))
    assert batch["train"][0].shape == (4, 5, 1, 8, 8) and batch["test"][1].shape == (4, 25)
    assert batch["train"][0].dtype == torch.float32 and batch["train"][0].max() <= 1.0
    with pytest.raises(ValueError, match="meta-val split has only 2 classes"):
        Digits(5, meta_split="val", rotations=False)
