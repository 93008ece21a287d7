"""Few-shot classification over any labelled dataset or an Omniglot-layout image folder.

Classes are split once, disjointly, into meta-train/val/test (seeded by
``split_seed``); class augmentations such as ``Rotation([90, 180, 270])`` then
add new classes inside each split, so a class and its rotations never straddle
two splits. Tasks are N-way combinations of a split's classes, relabelled
``0 .. N-1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from fastmeta.data._images import ImageDataset, float_dtype
from fastmeta.data._protocol import META_SPLITS, ClassDataset, CombinationMetaDataset, Task
from fastmeta.data._transforms import Rotation

ClassSplits = Sequence[float] | Mapping[str, Sequence[Hashable]]
DEFAULT_CLASS_SPLITS: tuple[float, float, float] = (0.6, 0.2, 0.2)

_NO_LABELS = (
    "{who} needs a labelled dataset: dataset[0] is {what}, not an (input, label) pair; "
    "pass labels=[...] with one label per sample, or a dataset of (input, label) pairs"
)


def _plain(label: Any) -> Hashable:
    if isinstance(label, torch.Tensor | np.ndarray | np.generic):
        label = label.item()
    try:
        hash(label)
    except TypeError:
        raise TypeError(f"labels must be hashable (ints, strings), got {label!r}") from None
    return label


def _is_pair(sample: Any) -> bool:
    return isinstance(sample, tuple | list) and len(sample) == 2


def extract_labels(
    dataset: Any, labels: Sequence[Any] | None, who: str = "FewShotDataset"
) -> tuple[list[Hashable], bool]:
    """Return one label per sample, and whether samples are ``(input, label)`` pairs.

    Labels come from ``labels``, else ``dataset.targets``, else a two-tensor
    ``TensorDataset``, else by reading every sample.

    Raises:
        TypeError: If the dataset has no labels.
        ValueError: If the dataset is empty or ``labels`` has the wrong length.
    """
    size = len(dataset)
    if size == 0:
        raise ValueError(f"{who} got an empty dataset; it needs labelled samples")
    first = dataset[0]
    if labels is None:
        targets = getattr(dataset, "targets", None)
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
            targets = dataset.tensors[1]
        if targets is not None and _is_pair(first):
            labels = targets
        elif not _is_pair(first):
            raise TypeError(_NO_LABELS.format(who=who, what=type(first).__name__))
        else:
            labels = [dataset[i][1] for i in range(size)]
    values = labels.tolist() if isinstance(labels, torch.Tensor | np.ndarray) else list(labels)
    if len(values) != size:
        raise ValueError(
            f"labels has {len(values)} entries but the dataset has {size} samples; "
            "give one label per sample"
        )
    return [_plain(v) for v in values], _is_pair(first)


def _sorted_unique(values: Sequence[Hashable]) -> list[Hashable]:
    unique = set(values)
    try:
        return sorted(unique)  # type: ignore[type-var]
    except TypeError:
        return sorted(unique, key=repr)


def split_classes(
    classes: Sequence[Hashable], class_splits: ClassSplits, split_seed: int
) -> dict[str, list[Hashable]]:
    """Partition ``classes`` into meta-train/val/test.

    Args:
        classes: All class labels, sorted.
        class_splits: Fractions ``(train, val, test)`` summing to 1, or a mapping
            from split name to its labels.
        split_seed: Seed of the random assignment for fractions.

    Returns:
        A dict from ``"train"``/``"val"``/``"test"`` to sorted labels.

    Raises:
        ValueError: For bad fractions, unknown labels or overlapping splits.
    """
    if isinstance(class_splits, Mapping):
        unknown_splits = set(class_splits) - set(META_SPLITS)
        if unknown_splits:
            raise ValueError(
                f"class_splits keys must be among {META_SPLITS}, got {sorted(unknown_splits)}"
            )
        known = set(classes)
        result: dict[str, list[Hashable]] = {}
        owner: dict[Hashable, str] = {}
        for split in META_SPLITS:
            members = [_plain(c) for c in class_splits.get(split, [])]
            for label in members:
                if label not in known:
                    raise ValueError(
                        f"class_splits[{split!r}] names {label!r}, which no sample has; "
                        f"known classes start {list(classes)[:5]!r}"
                    )
                if label in owner:
                    raise ValueError(
                        f"class {label!r} is in both class_splits[{owner[label]!r}] and "
                        f"class_splits[{split!r}]; meta-splits must not share classes"
                    )
                owner[label] = split
            result[split] = _sorted_unique(members)
        return result
    fractions = [float(f) for f in class_splits]
    if len(fractions) != 3 or any(not math.isfinite(f) or f < 0 for f in fractions):
        raise ValueError(
            f"class_splits must be 3 fractions (train, val, test) >= 0 or a mapping, "
            f"got {class_splits!r}"
        )
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"class_splits fractions must sum to 1, got {class_splits!r}")
    n = len(classes)
    n_val = math.floor(fractions[1] * n + 0.5)
    n_test = math.floor(fractions[2] * n + 0.5)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    order = np.random.default_rng(split_seed).permutation(n)
    shuffled = [classes[i] for i in order]
    n_train = n - n_val - n_test
    return {
        "train": _sorted_unique(shuffled[:n_train]),
        "val": _sorted_unique(shuffled[n_train : n_train + n_val]),
        "test": _sorted_unique(shuffled[n_train + n_val :]),
    }


class ClassTask(Task):
    """All samples of one class (one item of a ``LabelledClassDataset``).

    Args:
        index: The class id in its ``ClassDataset`` (also every sample's target).
        source: The labelled dataset holding the samples.
        members: Indices of the class's samples in ``source``.
        paired: Whether ``source`` returns ``(input, label)`` pairs.
        augmentation: Class augmentation applied to every input (e.g. a ``Rotation``).
        transform: Applied to every input after the augmentation.
    """

    def __init__(
        self,
        index: int,
        source: Any,
        members: np.ndarray,
        paired: bool,
        augmentation: Callable[[Any], Any] | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(index, 1, transform)
        self.label = index
        self.source = source
        self.members = members
        self.paired = paired
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.source[int(self.members[index])]
        x = sample[0] if self.paired else sample
        if self.augmentation is not None:
            x = self.augmentation(x)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.label

    def _stack(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        vectorisable = self.augmentation is None or isinstance(self.augmentation, Rotation)
        if self.transform or not vectorisable:
            return None
        rows = torch.as_tensor(self.members[np.asarray(indices, dtype=np.int64)])
        if isinstance(self.source, TensorDataset):
            x = self.source.tensors[0].index_select(0, rows)
        elif isinstance(self.source, ImageDataset):
            images = self.source.rows(rows)
            if images is None:
                return None
            x = images
        else:
            return None
        if self.augmentation is not None:
            x = self.augmentation(x)
        return x, torch.full((len(rows),), self.label, dtype=torch.long)


class LabelledClassDataset(ClassDataset):
    """The classes of one meta-split of any labelled dataset.

    Args:
        dataset: A dataset of ``(input, label)`` pairs (or of inputs, with ``labels``).
        meta_train: Use the meta-train classes.
        meta_val: Use the meta-validation classes.
        meta_test: Use the meta-test classes.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        class_augmentations: E.g. ``[Rotation([90, 180, 270])]``: new classes per split.
        transform: Applied to every input.
        labels: One label per sample, if the dataset does not return them.
        class_splits: ``(train, val, test)`` fractions of the classes, or a
            mapping from split name to class labels.
        split_seed: Seed of the class split; keep it equal across the three splits.

    Attributes:
        labels: The base class labels of this split, sorted.

    Raises:
        TypeError: If the dataset has no labels.
        ValueError: If the split gets no classes, or for bad ``class_splits``.

    Example:
        >>> data = TensorDataset(torch.randn(40, 3), torch.arange(40) % 10)
        >>> train = LabelledClassDataset(data, meta_split="train")
        >>> test = LabelledClassDataset(data, meta_split="test")
        >>> len(train), len(test), set(train.labels) & set(test.labels)
        (6, 2, set())
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        class_augmentations: Sequence[Any] | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        labels: Sequence[Any] | None = None,
        class_splits: ClassSplits = DEFAULT_CLASS_SPLITS,
        split_seed: int = 0,
    ) -> None:
        super().__init__(meta_train, meta_val, meta_test, meta_split, class_augmentations)
        self.dataset = dataset
        self.transform = transform
        all_labels, self._paired = extract_labels(dataset, labels, type(self).__name__)
        classes = _sorted_unique(all_labels)
        self.class_splits = split_classes(classes, class_splits, split_seed)
        self.labels = self.class_splits[self.meta_split]
        if not self.labels:
            raise ValueError(
                f"the meta-{self.meta_split} split has no classes: the dataset has "
                f"{len(classes)} classes and class_splits={class_splits!r}; give this split "
                "a positive fraction or explicit classes"
            )
        position = {label: i for i, label in enumerate(self.labels)}
        members: list[list[int]] = [[] for _ in self.labels]
        for sample, label in enumerate(all_labels):
            slot = position.get(label)
            if slot is not None:
                members[slot].append(sample)
        self._members = [np.asarray(m, dtype=np.int64) for m in members]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def class_sizes(self) -> list[int]:
        return [len(m) for m in self._members] * (len(self.class_augmentations) + 1)

    def describe_class(self, index: int) -> str:
        label = self.labels[index % self.num_classes]
        names = getattr(self.dataset, "classes", None)
        name = names[label] if isinstance(label, int) and names is not None else label
        text = f"class {name!r}"
        if isinstance(self.dataset, ImageFolderDataset):
            text += f" (folder {self.dataset.root / str(name)})"
        augmentation = self.get_class_augmentation(index)
        return text if augmentation is None else f"{text} under {augmentation!r}"

    def __getitem__(self, index: int) -> ClassTask:
        if not 0 <= index < len(self):
            raise IndexError(f"class index {index} out of range for {len(self)} classes")
        return ClassTask(
            index,
            self.dataset,
            self._members[index % self.num_classes],
            self._paired,
            augmentation=self.get_class_augmentation(index),
            transform=self.transform,
        )


class FewShotDataset(CombinationMetaDataset):
    """N-way few-shot tasks over any labelled ``Dataset``, with class-disjoint meta-splits.

    Args:
        dataset: A dataset of ``(input, label)`` pairs (or of inputs, with ``labels``).
        num_classes_per_task: ``N`` of N-way.
        meta_train: Use the meta-train classes.
        meta_val: Use the meta-validation classes.
        meta_test: Use the meta-test classes.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        transform: Applied to every input.
        target_transform: Per-task target transform; ``None`` relabels ``0 .. N-1``.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        class_augmentations: E.g. ``[Rotation([90, 180, 270])]``.
        labels: One label per sample, if the dataset does not return them.
        class_splits: ``(train, val, test)`` fractions of the classes (default
            0.6/0.2/0.2), or a mapping from split name to class labels.
        split_seed: Seed of the class split; keep it equal across the three splits.
        seed: Seed of the per-task sample choices; ``None`` draws one from the OS.

    Raises:
        TypeError: If the dataset has no labels.
        ValueError: If a split has fewer than ``num_classes_per_task`` classes or a
            class has fewer samples than the ``ClassSplitter`` takes.

    Example:
        >>> from fastmeta.data import BatchMetaDataLoader, ClassSplitter
        >>> data = TensorDataset(torch.randn(500, 16), torch.arange(500) % 25)
        >>> tasks = FewShotDataset(data, 5, meta_split="train", seed=0,
        ...     dataset_transform=ClassSplitter(num_train_per_class=1, num_test_per_class=3))
        >>> batch = next(iter(BatchMetaDataLoader(tasks, batch_size=4)))
        >>> batch["train"][0].shape, batch["test"][1].shape, batch["test"][1].dtype
        (torch.Size([4, 5, 16]), torch.Size([4, 15]), torch.int64)
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        num_classes_per_task: int,
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        class_augmentations: Sequence[Any] | None = None,
        *,
        labels: Sequence[Any] | None = None,
        class_splits: ClassSplits = DEFAULT_CLASS_SPLITS,
        split_seed: int = 0,
        seed: int | None = None,
    ) -> None:
        classes = LabelledClassDataset(
            dataset,
            meta_train,
            meta_val,
            meta_test,
            meta_split,
            class_augmentations,
            transform=transform,
            labels=labels,
            class_splits=class_splits,
            split_seed=split_seed,
        )
        super().__init__(
            classes, num_classes_per_task, target_transform, dataset_transform, seed=seed
        )


def _import_pil() -> Any:
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading image folders needs Pillow: pip install 'fastmeta[images]' "
            "(or pip install Pillow)"
        ) from error
    return Image


class ImageFolderDataset(ImageDataset):
    """Images in class folders, as ``(image, class index)`` pairs (read on every access).

    Accepts the Omniglot layout ``root/alphabet/character/*.png`` and the flat
    layout ``root/class/*.png``: a folder that holds images directly is a class,
    otherwise each of its sub-folders holding images is. Images are read with
    Pillow (``pip install 'fastmeta[images]'``) into float tensors ``[C, H, W]``
    in ``[0, 1]``.

    A class folder without images is an error (as in torchvision's ``ImageFolder``):
    skipping it would shift the index of every later class, and with it the class
    splits. An image that cannot be decoded raises ``OSError`` naming its path, when it
    is read, or at construction with ``verify=True``.

    Args:
        root: The top folder.
        image_size: Resize every image to ``size`` or ``(height, width)``.
        mode: Pillow mode: ``"L"`` (grey, 1 channel) or ``"RGB"`` (3 channels).
        extensions: File suffixes counted as images.
        dtype: Floating dtype of the image tensors (default ``torch.float32``).
        verify: Decode every image once at construction, so that a corrupt or
            truncated file fails now, naming its path, instead of mid-training.

    Attributes:
        classes: Class names, relative paths such as ``"Greek/character03"``.
        samples: ``(path, class index)`` of every image.
        targets: Class index of every image.

    Raises:
        FileNotFoundError: If ``root`` is not a folder.
        ValueError: If no class folder holds an image, or a class folder is empty.
        OSError: With ``verify=True``, if an image cannot be decoded.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        image_size: int | tuple[int, int] | None = None,
        mode: str = "L",
        extensions: Sequence[str] = (".png",),
        dtype: torch.dtype = torch.float32,
        verify: bool = False,
    ) -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' (grey) or 'RGB', got {mode!r}")
        self.dtype = float_dtype(dtype)
        self._image = _import_pil()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root={str(root)!r} is not a folder of class folders")
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if len(size) != 2 or any(isinstance(s, bool) or int(s) < 1 for s in size):
                raise ValueError(
                    f"image_size must be a positive int or (height, width), got {image_size!r}"
                )
            image_size = (int(size[0]), int(size[1]))
        self.image_size = image_size
        self.mode = mode
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes: list[str] = []
        self.samples: list[tuple[Path, int]] = []
        for folder in self._class_folders():
            images = self._images_in(folder)
            label = len(self.classes)
            self.classes.append(folder.relative_to(self.root).as_posix())
            self.samples.extend((path, label) for path in images)
        if not self.classes:
            raise ValueError(
                f"no {'/'.join(self.extensions)} images found under {self.root}; expected "
                "root/alphabet/character/*.png or root/class/*.png"
            )
        self.targets = [label for _, label in self.samples]
        if verify:
            for index in range(len(self.samples)):
                self.pixels(index)

    def _images_in(self, folder: Path) -> list[Path]:
        return sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in self.extensions
        )

    def _empty_class(self, folder: Path) -> ValueError:
        return ValueError(
            f"class folder {str(folder)!r} holds no {'/'.join(self.extensions)} images; add "
            f"its images or remove the folder (skipping it would shift the index of every "
            f"later class, and the class splits with it)"
        )

    def _class_folders(self) -> list[Path]:
        """Folders holding images directly, or else each sub-folder of a top folder."""
        folders = []
        for child in sorted(p for p in self.root.iterdir() if p.is_dir()):
            subfolders = sorted(p for p in child.iterdir() if p.is_dir())
            if self._images_in(child) or not subfolders:
                folders.append(child)  # a class of the flat layout (empty: error below)
            else:
                folders.extend(subfolders)  # the characters of an alphabet
        if not any(self._images_in(folder) for folder in folders):
            return []
        for folder in folders:
            if not self._images_in(folder):
                raise self._empty_class(folder)
        return folders

    def pixels(self, index: int) -> torch.Tensor:
        """Bytes ``[C, H, W]`` of image ``index``; ``OSError`` naming the file if unreadable."""
        path, label = self.samples[index]
        try:
            with self._image.open(path) as image:
                image = image.convert(self.mode)
                if self.image_size is not None:
                    height, width = self.image_size
                    image = image.resize((width, height), self._image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for bad files
            raise OSError(
                f"cannot read image {str(path)!r} (class {self.classes[label]!r}): "
                f"{type(error).__name__}: {error}; replace or remove the file "
                f"(ImageFolderDataset(..., verify=True) checks every image up front)"
            ) from error
        pixels = torch.from_numpy(array.copy())
        return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_image")  # modules do not pickle; re-imported in workers
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._image = _import_pil()


class FewShotImageFolder(FewShotDataset):
    """N-way few-shot tasks from an image folder (Omniglot layout), class-disjoint splits.

    ``root/alphabet/character/*.png`` or ``root/class/*.png``, read by
    ``ImageFolderDataset``. For the MAML Omniglot setup use ``image_size=28``
    and ``class_augmentations=[Rotation([90, 180, 270])]``.

    Args:
        root: The top folder.
        num_classes_per_task: ``N`` of N-way.
        meta_train: Use the meta-train classes.
        meta_val: Use the meta-validation classes.
        meta_test: Use the meta-test classes.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        transform: Applied to every image tensor.
        target_transform: Per-task target transform; ``None`` relabels ``0 .. N-1``.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        class_augmentations: E.g. ``[Rotation([90, 180, 270])]``.
        image_size: Resize every image to ``size`` or ``(height, width)``.
        mode: Pillow mode, ``"L"`` or ``"RGB"``.
        dtype: Floating dtype of the images (default ``torch.float32``).
        class_splits: ``(train, val, test)`` fractions of the classes, or a
            mapping from split name to class names (``"alphabet/character"``).
        split_seed: Seed of the class split; keep it equal across the three splits.
        seed: Seed of the per-task sample choices.
        verify: Decode every image at construction (see ``ImageFolderDataset``).

    Raises:
        ValueError: If a class folder has fewer images than the ``ClassSplitter``
            takes or none at all, a split has fewer classes than
            ``num_classes_per_task``, or no images are found.
        OSError: With ``verify=True``, if an image cannot be decoded.

    Example:
        >>> tasks = FewShotImageFolder("omniglot/images_background", 5, meta_split="train",
        ...     image_size=28, class_augmentations=[Rotation([90, 180, 270])],
        ...     dataset_transform=ClassSplitter(num_train_per_class=1, num_test_per_class=15),
        ... )  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        num_classes_per_task: int,
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        class_augmentations: Sequence[Any] | None = None,
        *,
        image_size: int | tuple[int, int] | None = None,
        mode: str = "L",
        dtype: torch.dtype = torch.float32,
        class_splits: ClassSplits = DEFAULT_CLASS_SPLITS,
        split_seed: int = 0,
        seed: int | None = None,
        verify: bool = False,
    ) -> None:
        images = ImageFolderDataset(
            root, image_size=image_size, mode=mode, dtype=dtype, verify=verify
        )
        if isinstance(class_splits, Mapping):  # accept class names for convenience
            index = {name: i for i, name in enumerate(images.classes)}
            class_splits = {
                split: [index.get(str(c), c) for c in members]
                for split, members in class_splits.items()
            }
        super().__init__(
            images,
            num_classes_per_task,
            meta_train,
            meta_val,
            meta_test,
            meta_split,
            transform,
            target_transform,
            dataset_transform,
            class_augmentations,
            class_splits=class_splits,
            split_seed=split_seed,
            seed=seed,
        )
