"""Target and class transforms: ``Categorical`` relabelling and ``Rotation`` classes."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch


class Categorical:
    """Relabel the classes of one task to ``0 .. num_classes - 1``.

    Labels are given in order of first appearance. ``CombinationMetaDataset``
    gives every task a fresh copy, primed with the task's classes in the order
    the sampler drew them, so the class at position ``j`` of the task index gets
    label ``j`` whatever order the samples are read in. Because the random
    sampler draws classes in random order, the label of a class changes from
    task to task, as few-shot training expects.

    Args:
        num_classes: Number of classes per task. ``None`` infers it from the
            labels seen; otherwise a task with more labels raises.

    Example:
        >>> relabel = Categorical(num_classes=2)
        >>> [relabel(c) for c in ["cat", "dog", "cat"]]
        [0, 1, 0]
    """

    def __init__(self, num_classes: int | None = None) -> None:
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        self.num_classes = num_classes
        self._classes: dict[Hashable, int] = {}

    @property
    def classes(self) -> dict[Hashable, int]:
        """A copy of the mapping from original label to new label seen so far."""
        return dict(self._classes)

    def reset(self) -> None:
        """Forget the labels seen so far."""
        self._classes = {}

    def fresh(self) -> Categorical:
        """Return an unused copy with the same ``num_classes``."""
        return type(self)(self.num_classes)

    def __call__(self, target: Hashable) -> int:
        if isinstance(target, torch.Tensor | np.generic | np.ndarray):
            target = target.item()
        label = self._classes.get(target)
        if label is None:
            label = len(self._classes)
            if self.num_classes is not None and label >= self.num_classes:
                raise ValueError(
                    f"Categorical(num_classes={self.num_classes}) saw a new label {target!r} "
                    f"after {sorted(self._classes, key=repr)!r}; a task must have at most "
                    f"{self.num_classes} classes, or use Categorical(num_classes=None)"
                )
            self._classes[target] = label
        return label

    def __repr__(self) -> str:
        return f"Categorical(num_classes={self.num_classes})"


class Rotation:
    """Rotate images by a multiple of 90 degrees (counter-clockwise).

    Used as a class augmentation, each angle makes a new class (the MAML
    Omniglot setup): ``class_augmentations=[Rotation([90, 180, 270])]`` turns
    every class into four. Works on tensors and NumPy arrays whose last two
    dimensions are height and width, single images or batches.

    Args:
        angle: An angle in degrees, a multiple of 90, or a sequence of them;
            a sequence stands for one ``Rotation`` per angle when iterated.

    Example:
        >>> image = torch.arange(4.0).reshape(1, 2, 2)
        >>> Rotation(90)(image)
        tensor([[[1., 3.],
                 [0., 2.]]])
    """

    def __init__(self, angle: int | Sequence[int]) -> None:
        angles = [angle] if isinstance(angle, int) else list(angle)
        if not angles:
            raise ValueError("angle must be a multiple of 90 or a non-empty list of them, got []")
        for value in angles:
            if isinstance(value, bool) or not isinstance(value, int) or value % 90 != 0:
                raise ValueError(
                    f"angle must be a multiple of 90 degrees (0, 90, 180, 270), got {value!r}; "
                    "other angles need interpolation, which fastmeta does not do"
                )
        self.angle: int | list[int] = angle if isinstance(angle, int) else angles

    def __iter__(self) -> Iterator[Rotation]:
        angles = [self.angle] if isinstance(self.angle, int) else self.angle
        return iter([Rotation(a) for a in angles])

    def __call__(self, image: Any) -> Any:
        if not isinstance(self.angle, int):
            raise TypeError(
                f"Rotation({self.angle!r}) holds several angles; iterate it (or use it in "
                "class_augmentations) to get one Rotation per angle"
            )
        quarter_turns = (self.angle // 90) % 4
        if isinstance(image, torch.Tensor):
            if image.dim() < 2:
                raise TypeError(
                    f"Rotation needs an image with at least 2 dimensions (H, W), "
                    f"got a tensor of shape {tuple(image.shape)}"
                )
            return torch.rot90(image, quarter_turns, dims=(-2, -1))
        if isinstance(image, np.ndarray) and image.ndim >= 2:
            return np.ascontiguousarray(np.rot90(image, quarter_turns, axes=(-2, -1)))
        raise TypeError(
            "Rotation works on tensors or arrays of shape (..., H, W), got "
            f"{type(image).__name__}; convert images to tensors first"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rotation) and other.angle == self.angle

    def __hash__(self) -> int:
        angle = self.angle if isinstance(self.angle, int) else tuple(self.angle)
        return hash(("Rotation", angle))

    def __repr__(self) -> str:
        return f"Rotation({self.angle!r})"
