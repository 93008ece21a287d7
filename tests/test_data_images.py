"""One image reader: arrays, folders and digits scale integer pixels to [0, 1] the same way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmeta.data import (
    BatchMetaDataLoader,
    ClassSplitter,
    Digits,
    FewShotDataset,
    ImageArrayDataset,
    ImageFolderDataset,
    Rotation,
)
from fastmeta.data._images import ImageDataset


def _array(dtype: torch.dtype = torch.float32) -> ImageArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 4, 4), generator=g, dtype=torch.uint8)
    return ImageArrayDataset(images, [i % 8 for i in range(40)], [f"c{i}" for i in range(8)],
                             dtype=dtype)


def _batch(tasks: FewShotDataset) -> dict:
    return next(iter(BatchMetaDataLoader(tasks, batch_size=3, shuffle=False)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_array_images_read_alone_and_in_rows_alike(dtype):
    data = _array(dtype)
    rows = data.rows(torch.tensor([3, 0, 7]))
    for k, index in enumerate((3, 0, 7)):
        image, label = data[index]
        assert image.dtype == dtype and label == index % 8
        torch.testing.assert_close(image, data.images[index].to(dtype) / 255, rtol=0, atol=0)
        assert torch.equal(rows[k], image)


def test_few_shot_batches_take_the_fast_path_with_the_same_numbers():
    def tasks(transform):  # type: ignore[no-untyped-def]
        return FewShotDataset(_array(), 3, meta_split="train", seed=0, transform=transform,
                              class_augmentations=[Rotation([90])],
                              dataset_transform=ClassSplitter(num_train_per_class=1,
                                                              num_test_per_class=2))

    fast, slow = _batch(tasks(None)), _batch(tasks(lambda x: x))  # a transform: one by one
    for part in ("train", "test"):
        assert all(torch.equal(a, b) for a, b in zip(fast[part], slow[part]))


def test_digits_are_array_images_with_sixteen_grey_levels():
    tasks = Digits(5, meta_split="train", seed=0, dtype=torch.float64)
    source = tasks.dataset.dataset
    assert isinstance(source, ImageArrayDataset) and source.scale == 16.0
    image, _ = source[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float64
    assert torch.equal(image * 16, (image * 16).round()) and 0 <= image.min() <= image.max() <= 1


def test_an_image_folder_is_an_image_dataset_with_exact_float64_pixels(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    (tmp_path / "a").mkdir()
    image_module.fromarray(pixels).save(tmp_path / "a" / "0.png")
    data = ImageFolderDataset(tmp_path, dtype=torch.float64)
    assert isinstance(data, ImageDataset) and data.rows(torch.tensor([0])) is None
    image, label = data[0]
    expected = torch.from_numpy(pixels).to(torch.float64).unsqueeze(0) / 255
    assert label == 0 and torch.equal(image, expected)


def test_a_dtype_that_is_not_floating_is_refused_by_every_reader(tmp_path):
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype, got torch.int64"):
        _array(torch.int64)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        Digits(5, meta_split="train", dtype=torch.int64)
