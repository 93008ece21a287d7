"""The one reader behind every labelled image dataset: integer pixels in, floats in [0, 1] out.

Image folders (decoded by Pillow on every read), image arrays (Omniglot, miniImageNet,
CIFAR-FS/FC100, kept as bytes) and scikit-learn's digits (pixel values 0..16) differ only
in where the integer pixels of image ``i`` come from. :class:`ImageDataset` does the rest
once: class names and targets, the float dtype, the scaling to ``[0, 1]``, and reading
many rows at once for the few-shot samplers' fast path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def float_dtype(dtype: Any) -> torch.dtype:
    """``dtype`` if it is a floating torch dtype; ``TypeError`` naming it otherwise."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """``(image, class index)`` pairs: images ``[C, H, W]`` as floats in ``[0, 1]``.

    Subclasses give the integer pixels of one image (:meth:`pixels`) and, where they hold
    them all in memory, of many at once (:meth:`rows`).

    Attributes:
        classes: Class names, indexed by the targets.
        targets: Class index of every image.
        dtype: Floating dtype of the images returned.
        scale: The pixel value that reads as 1.0 (255 for bytes).
    """

    classes: list[str]
    targets: list[int]
    dtype: torch.dtype
    scale: float = 255.0

    def __len__(self) -> int:
        return len(self.targets)

    def pixels(self, index: int) -> torch.Tensor:
        """Integer pixels ``[C, H, W]`` of image ``index``."""
        raise NotImplementedError

    def rows(self, indices: torch.Tensor) -> torch.Tensor | None:
        """Float images ``[len(indices), C, H, W]`` at once, or ``None`` (read one by one)."""
        return None

    def to_float(self, pixels: torch.Tensor) -> torch.Tensor:
        """Integer pixels as floats in ``[0, 1]`` of :attr:`dtype`."""
        return pixels.to(self.dtype) / self.scale

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.to_float(self.pixels(index)), self.targets[index]


class ImageArrayDataset(ImageDataset):
    """Integer images ``[N, C, H, W]`` kept as they are, read as floats in ``[0, 1]``.

    Args:
        images: ``uint8`` array or tensor ``[N, C, H, W]``.
        targets: One class index per image.
        classes: Class names, indexed by the targets.
        dtype: Floating dtype of the images returned.
        scale: The pixel value that reads as 1.0 (255 for bytes; 16 for the digits).
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        targets: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        *,
        dtype: torch.dtype = torch.float32,
        scale: float = 255.0,
    ) -> None:
        self.images = torch.as_tensor(images)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        self.targets = [int(t) for t in targets]
        if len(self.targets) != len(self.images):
            raise ValueError(
                f"{len(self.targets)} targets for {len(self.images)} images; give one each"
            )
        self.classes = list(classes)
        self.dtype = float_dtype(dtype)
        self.scale = float(scale)

    def pixels(self, index: int) -> torch.Tensor:
        return self.images[index]

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return self.to_float(self.images.index_select(0, indices))
