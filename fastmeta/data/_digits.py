"""``Digits``: an offline few-shot image benchmark from scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fastmeta.data._classification import DEFAULT_CLASS_SPLITS, ClassSplits, FewShotDataset
from fastmeta.data._images import ImageArrayDataset
from fastmeta.data._transforms import Rotation


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Digits needs scikit-learn's bundled digits: pip install 'fastmeta[digits]' "
            "(or pip install scikit-learn)"
        ) from error
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)  # pixel values are 0..16
    return images[:, None], np.asarray(bunch.target, dtype=np.int64)


class Digits(FewShotDataset):
    """Few-shot classification on scikit-learn's 1,797 bundled 8x8 digits; no download.

    Each of the 10 digits is a base class (about 180 images each). The digits
    are split by class into meta-train/val/test (6/2/2 by default, seeded by
    ``split_seed``); with ``rotations`` every 90-degree rotation of a digit is a
    new class in the same split (the MAML Omniglot augmentation), giving
    24/8/8 classes. Inputs are float tensors ``[1, 8, 8]`` in ``[0, 1]``.

    Args:
        num_classes_per_task: ``N`` of N-way (at most the classes of the split).
        meta_train: Use the meta-train classes.
        meta_val: Use the meta-validation classes.
        meta_test: Use the meta-test classes.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        transform: Applied to every image (disables the fast tensor path).
        target_transform: Per-task target transform; ``None`` relabels ``0 .. N-1``.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        rotations: Add the 90/180/270-degree rotations of each digit as classes.
        class_splits: ``(train, val, test)`` fractions of the 10 digits, or a
            mapping from split name to digits.
        split_seed: Seed of the class split; keep it equal across the three splits.
        dtype: Floating dtype of the images (default ``torch.float32``).
        seed: Seed of the per-task sample choices; ``None`` draws one from the OS.

    Raises:
        ImportError: If scikit-learn is not installed.

    Example:
        >>> from fastmeta.data import BatchMetaDataLoader, ClassSplitter
        >>> tasks = Digits(5, meta_split="train", seed=0,
        ...     dataset_transform=ClassSplitter(num_train_per_class=1, num_test_per_class=5))
        >>> batch = next(iter(BatchMetaDataLoader(tasks, batch_size=2)))
        >>> batch["train"][0].shape, batch["test"][1].shape
        (torch.Size([2, 5, 1, 8, 8]), torch.Size([2, 25]))
    """

    def __init__(
        self,
        num_classes_per_task: int,
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        *,
        rotations: bool = True,
        class_splits: ClassSplits = DEFAULT_CLASS_SPLITS,
        split_seed: int = 0,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        images, digits = _load_digits()
        data = ImageArrayDataset(images, digits, [str(d) for d in range(10)], dtype=dtype,
                                 scale=16.0)
        super().__init__(
            data,
            num_classes_per_task,
            meta_train,
            meta_val,
            meta_test,
            meta_split,
            transform,
            target_transform,
            dataset_transform,
            [Rotation([90, 180, 270])] if rotations else None,
            class_splits=class_splits,
            split_seed=split_seed,
            seed=seed,
        )
