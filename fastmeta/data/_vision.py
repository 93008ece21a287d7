"""The standard few-shot vision suite: Omniglot, miniImageNet, CIFAR-FS and FC100.

Each dataset reads the archive its authors distribute (downloading it into ``root``
with ``download=True``, checking the published MD5), caches the decoded images as
one ``.npz`` file beside it, and is a :class:`~fastmeta.data.FewShotDataset`: with
``dataset_transform=ClassSplitter(...)`` its tasks go through ``BatchMetaDataLoader``
straight into ``learner.meta_step``. Names and arguments follow torchmeta's
``torchmeta.datasets`` classes of the same names.

The class splits are data files in ``fastmeta/data/splits/``, copied from torchmeta
1.8.0 (each file names its source). miniImageNet's split (Ravi & Larochelle 2017) is
the split of its three pickle files.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmeta.data._classification import FewShotDataset, _import_pil
from fastmeta.data._download import fetch_archive
from fastmeta.data._images import ImageArrayDataset, float_dtype
from fastmeta.data._protocol import resolve_meta_split
from fastmeta.data._transforms import Rotation

_SPLITS_DIR = Path(__file__).with_name("splits")


def load_split(name: str) -> dict[str, Any]:
    """The class split ``fastmeta/data/splits/{name}.json``: ``train``/``val``/``test`` lists
    and its ``source``."""
    with open(_SPLITS_DIR / f"{name}.json", encoding="utf-8") as stream:
        return dict(json.load(stream))


def _save_cache(path: Path, **arrays: np.ndarray) -> None:
    partial = path.with_name(path.name + ".part.npz")
    np.savez(partial, **arrays)  # type: ignore[arg-type]
    partial.replace(path)


class _VisionFewShot(FewShotDataset):
    """A ``FewShotDataset`` over an ``ImageArrayDataset`` with named class splits."""

    root: Path

    def _build(
        self,
        images: ImageArrayDataset,
        splits: Mapping[str, Sequence[str]],
        num_classes_per_task: int,
        meta_split: str,
        transform: Callable[[Any], Any] | None,
        target_transform: Callable[[Any], Any] | None,
        dataset_transform: Callable[[Any], Any] | None,
        class_augmentations: Sequence[Any] | None,
        seed: int | None,
    ) -> None:
        index = {name: i for i, name in enumerate(images.classes)}
        missing = [c for members in splits.values() for c in members if c not in index]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the data under {self.root} has no class "
                f"{missing[0]!r} ({len(missing)} split classes missing); the archive is not "
                "the published one. Delete the cached .npz and the archive, and download again"
            )
        super().__init__(
            images,
            num_classes_per_task,
            meta_split=meta_split,
            transform=transform,
            target_transform=target_transform,
            dataset_transform=dataset_transform,
            class_augmentations=class_augmentations,
            class_splits={s: [index[c] for c in members] for s, members in splits.items()},
            seed=seed,
        )


class Omniglot(_VisionFewShot):
    """Omniglot (Lake et al. 2015) few-shot tasks, in the split of Vinyals et al. 2016.

    Reads ``images_background.zip`` and ``images_evaluation.zip`` from the Omniglot
    repository (github.com/brendenlake/omniglot, ``python/``) in ``root/omniglot/``;
    images are inverted (strokes 1, background 0, as torchmeta stores them), resized to
    ``image_size`` and cached in ``root/omniglot/omniglot_{image_size}.npz``. With
    ``use_vinyals_split`` (the default) the 1,623 characters are split 1028/172/423
    into meta-train/val/test, the split torchmeta ships (from Snell et al.'s
    prototypical-networks repository); otherwise meta-train is ``images_background``
    and meta-test ``images_evaluation``. With ``rotations`` each character's 90, 180
    and 270-degree rotations are new classes of the same split (the MAML setup of
    Finn et al. 2017), giving 4,112 meta-train classes.

    Args:
        root: Cache folder; files go to ``root/omniglot/``.
        num_classes_per_task: ``N`` of N-way.
        meta_train: Use the meta-train classes.
        meta_val: Use the meta-validation classes.
        meta_test: Use the meta-test classes.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        use_vinyals_split: The 1028/172/423 split; ``False``: background/evaluation.
        transform: Applied to every image tensor ``[1, H, W]``.
        target_transform: Per-task target transform; ``None`` relabels ``0 .. N-1``.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        class_augmentations: Further class augmentations, after the rotations.
        download: Fetch missing archives from the Omniglot repository.
        rotations: Add the 90/180/270-degree rotations as classes.
        image_size: Side of the square images (28 in the MAML paper; 105 is the original).
        dtype: Floating dtype of the images.
        seed: Seed of the per-task sample choices.

    Raises:
        FileNotFoundError: If an archive is missing and ``download`` is false.
        ConnectionError: If a download fails.
        ValueError: If an archive's MD5 is wrong, ``meta_val`` is asked without the
            Vinyals split, or the archives lack a character of the split.

    Example:
        >>> tasks = Omniglot("data", 5, meta_split="train", download=True,
        ...     dataset_transform=ClassSplitter(num_train_per_class=1, num_test_per_class=5),
        ... )  # doctest: +SKIP

    References:
        Lake, Salakhutdinov, Tenenbaum, "Human-level concept learning through
        probabilistic program induction", Science 2015. Vinyals et al., "Matching
        Networks for One Shot Learning", NeurIPS 2016.
    """

    folder = "omniglot"
    url_prefix = "https://github.com/brendenlake/omniglot/raw/master/python"
    # MD5s of the two archives, as torchmeta 1.8.0 and torchvision publish them.
    zips_md5: dict[str, str | None] = {
        "images_background": "68d2efa1b9178cc56df9314c21c6e718",
        "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    }

    def __init__(
        self,
        root: str | Path,
        num_classes_per_task: int,
        meta_train: bool = False,
        meta_val: bool = False,
        meta_test: bool = False,
        meta_split: str | None = None,
        use_vinyals_split: bool = True,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        class_augmentations: Sequence[Any] | None = None,
        download: bool = False,
        *,
        rotations: bool = True,
        image_size: int = 28,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        split = resolve_meta_split(meta_train, meta_val, meta_test, meta_split)
        if split == "val" and not use_vinyals_split:
            raise ValueError(
                "Omniglot(use_vinyals_split=False) has no meta-validation split (meta-train "
                "is images_background, meta-test images_evaluation); pass "
                "use_vinyals_split=True for the 1028/172/423 split with validation"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.root = Path(root).expanduser() / self.folder
        self.image_size = image_size
        images = self._load(download, float_dtype(dtype))
        if use_vinyals_split:
            table = load_split("omniglot_vinyals")
            splits = {s: table[s] for s in ("train", "val", "test")}
        else:
            splits = {
                "train": [c for c in images.classes if c.startswith("images_background/")],
                "test": [c for c in images.classes if c.startswith("images_evaluation/")],
            }
        augmentations = [Rotation([90, 180, 270])] if rotations else []
        augmentations += list(class_augmentations or [])
        self._build(
            images, splits, num_classes_per_task, split, transform, target_transform,
            dataset_transform, augmentations or None, seed,
        )  # fmt: skip

    def _load(self, download: bool, dtype: torch.dtype) -> ImageArrayDataset:
        cache = self.root / f"omniglot_{self.image_size}.npz"
        if not cache.is_file():
            archives = [
                fetch_archive(
                    self.root / f"{name}.zip",
                    f"{self.url_prefix}/{name}.zip",
                    md5,
                    download=download,
                    dataset="Omniglot",
                )
                for name, md5 in self.zips_md5.items()
            ]
            images, targets, classes = self._decode(archives)
            _save_cache(cache, images=images, targets=targets, classes=np.asarray(classes))
        with np.load(cache) as data:
            return ImageArrayDataset(
                data["images"], data["targets"], [str(c) for c in data["classes"]], dtype=dtype
            )

    def _decode(self, archives: Sequence[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        image_module = _import_pil()
        from PIL import ImageOps

        size = (self.image_size, self.image_size)
        entries: list[tuple[str, bytes]] = []
        for archive in archives:
            with zipfile.ZipFile(archive) as zipped:
                for member in zipped.namelist():
                    parts = member.split("/")
                    if member.lower().endswith(".png") and len(parts) == 4:
                        entries.append(("/".join(parts[:3]), zipped.read(member)))
        if not entries:
            raise ValueError(
                f"Omniglot: no images_*/alphabet/character/*.png entries in {list(archives)}; "
                "these are not the Omniglot archives"
            )
        classes = sorted({name for name, _ in entries})
        index = {name: i for i, name in enumerate(classes)}
        images = np.empty((len(entries), 1, *size), dtype=np.uint8)
        targets = np.empty(len(entries), dtype=np.int64)
        for row, (name, payload) in enumerate(entries):
            with image_module.open(io.BytesIO(payload)) as image:
                image = ImageOps.invert(image.convert("L"))
                image = image.resize(size, image_module.Resampling.BILINEAR)
                images[row, 0] = np.asarray(image, dtype=np.uint8)
            targets[row] = index[name]
        return images, targets, classes


def _plain_keys(value: Any) -> Any:
    """Decode the bytes keys and names of a pickle written by Python 2."""
    if isinstance(value, dict):
        return {_plain_keys(k): v for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("latin1")
    return value


class MiniImagenet(_VisionFewShot):
    """miniImageNet (Vinyals et al. 2016) in the split of Ravi & Larochelle 2017 (64/16/20).

    Reads the pickles ``mini-imagenet-cache-{train,val,test}.pkl`` (from Ren et al.'s
    few-shot-ssl-public repository, the files torchmeta uses), each a dict
    ``{"image_data": uint8 [N, 84, 84, 3], "class_dict": {class: [indices]}}``, from
    ``root/miniimagenet/``; they may be given directly, or extracted from
    ``mini-imagenet.tar.gz`` there (``download=True`` fetches that archive from Google
    Drive, the copy torchmeta names, and checks torchmeta's MD5). The split is that of the
    three files. Only the asked split's pickle is read.

    Args:
        root: Cache folder; files go to ``root/miniimagenet/``.
        num_classes_per_task: ``N`` of N-way.
        meta_train: Use the meta-train classes.
        meta_val: Use the meta-validation classes.
        meta_test: Use the meta-test classes.
        meta_split: ``"train"``, ``"val"`` or ``"test"``, instead of the flags.
        transform: Applied to every image tensor ``[3, 84, 84]``.
        target_transform: Per-task target transform; ``None`` relabels ``0 .. N-1``.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        class_augmentations: Class augmentations (none in the MAML setup).
        download: Fetch ``mini-imagenet.tar.gz`` if no pickle is there.
        dtype: Floating dtype of the images.
        seed: Seed of the per-task sample choices.

    Raises:
        FileNotFoundError: If the split's pickle and the archive are missing and
            ``download`` is false.
        ConnectionError: If a download fails.
        ValueError: If the archive's MD5 is wrong or a pickle is not in the format above.

    References:
        Ravi, Larochelle, "Optimization as a Model for Few-Shot Learning", ICLR 2017.
    """

    folder = "miniimagenet"
    gdrive_id = "16V_ZlkW4SsnNDtnGmaBRq2OoPmUOc5mY"
    url = f"https://drive.usercontent.google.com/download?id={gdrive_id}&export=download&confirm=t"
    archive_name = "mini-imagenet.tar.gz"
    # torchmeta 1.8.0's MD5 of the archive; the three pickles have no published checksum,
    # so their structure is checked instead.
    archive_md5: str | None = "b38f1eb4251fb9459ecc8e7febf9b2eb"
    pickle_name = "mini-imagenet-cache-{split}.pkl"

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
        download: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        split = resolve_meta_split(meta_train, meta_val, meta_test, meta_split)
        self.root = Path(root).expanduser() / self.folder
        images = self._load(split, download, float_dtype(dtype))
        self._build(
            images, {split: images.classes}, num_classes_per_task, split, transform,
            target_transform, dataset_transform, class_augmentations, seed,
        )  # fmt: skip

    def _load(self, split: str, download: bool, dtype: torch.dtype) -> ImageArrayDataset:
        path = self.root / self.pickle_name.format(split=split)
        if not path.is_file():
            archive = self.root / self.archive_name
            if not archive.is_file() and not download:
                raise FileNotFoundError(
                    f"MiniImagenet: neither {path} nor {archive} found. Pass download=True "
                    f"to fetch {self.archive_name} from Google Drive (id {self.gdrive_id}), "
                    f"or download it by hand from "
                    f"https://drive.google.com/file/d/{self.gdrive_id} and put it at "
                    f"{archive} (or its three mini-imagenet-cache-*.pkl files in "
                    f"{self.root}), then construct MiniImagenet(..., download=False)"
                )
            fetch_archive(
                archive, self.url, self.archive_md5, download=download, dataset="MiniImagenet"
            )
            self._extract(archive)
            if not path.is_file():
                raise ValueError(
                    f"MiniImagenet: {archive} holds no {path.name}; it is not the "
                    "mini-imagenet archive. Delete it and download again"
                )
        return self._read(path, dtype)

    def _extract(self, archive: Path) -> None:
        wanted = {self.pickle_name.format(split=s) for s in ("train", "val", "test")}
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                source = tar.extractfile(member) if member.isfile() else None
                if name in wanted and source is not None:
                    partial = self.root / (name + ".part")
                    with source, open(partial, "wb") as stream:
                        stream.write(source.read())
                    partial.replace(self.root / name)

    def _read(self, path: Path, dtype: torch.dtype) -> ImageArrayDataset:
        with open(path, "rb") as stream:
            data = _plain_keys(pickle.load(stream))  # noqa: S301 - the user's own data file
        problem = None
        if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
            problem = "it is not a dict with 'image_data' and 'class_dict'"
        else:
            pixels = np.asarray(data["image_data"])
            if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
                problem = f"image_data is {pixels.dtype} {list(pixels.shape)}"
        if problem is not None:
            raise ValueError(
                f"MiniImagenet: {path} is not a mini-imagenet cache pickle: {problem}; "
                "expected {'image_data': uint8 [N, 84, 84, 3], 'class_dict': "
                "{class: [indices]}}. Delete it and download again"
            )
        classes = sorted(str(c) for c in data["class_dict"])
        targets = np.full(len(pixels), -1, dtype=np.int64)
        for label, name in enumerate(classes):
            rows = np.asarray(data["class_dict"][name], dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= len(pixels)):
                raise ValueError(
                    f"MiniImagenet: {path}: class_dict[{name!r}] has indices outside the "
                    f"{len(pixels)} images; the file is corrupt. Delete it and download again"
                )
            targets[rows] = label
        keep = targets >= 0
        chw = torch.from_numpy(np.ascontiguousarray(pixels[keep].transpose(0, 3, 1, 2)))
        return ImageArrayDataset(chw, targets[keep], classes, dtype=dtype)


class _CIFAR100FewShot(_VisionFewShot):
    """CIFAR-100's python archive, decoded once into ``root/cifar100/cifar100.npz``."""

    folder = "cifar100"
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    archive_name = "cifar-100-python.tar.gz"
    # The MD5 published with the archive (and by torchvision and torchmeta 1.8.0).
    archive_md5: str | None = "eb9058c3a382ffc7106e4002c42a8d85"

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
        download: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        split = resolve_meta_split(meta_train, meta_val, meta_test, meta_split)
        self.root = Path(root).expanduser() / self.folder
        images, coarse = self._load(download, float_dtype(dtype))
        self._build(
            images, self._splits(images.classes, coarse), num_classes_per_task, split,
            transform, target_transform, dataset_transform, class_augmentations, seed,
        )  # fmt: skip

    def _splits(self, classes: list[str], coarse: list[str]) -> dict[str, list[str]]:
        raise NotImplementedError  # pragma: no cover - each subclass names its split

    def _load(self, download: bool, dtype: torch.dtype) -> tuple[ImageArrayDataset, list[str]]:
        cache = self.root / "cifar100.npz"
        if not cache.is_file():
            archive = fetch_archive(
                self.root / self.archive_name,
                self.url,
                self.archive_md5,
                download=download,
                dataset=type(self).__name__,
            )
            _save_cache(cache, **self._decode(archive))
        with np.load(cache) as data:
            fine_names = [str(n) for n in data["fine_names"]]
            coarse_names = [str(n) for n in data["coarse_names"]]
            # Class names "superclass/class"; the superclass of every fine class.
            coarse_of = {int(f): int(c) for f, c in zip(data["fine"], data["coarse"], strict=True)}
            classes = [f"{coarse_names[coarse_of[i]]}/{n}" for i, n in enumerate(fine_names)]
            images = ImageArrayDataset(data["images"], data["fine"], classes, dtype=dtype)
        return images, [coarse_names[coarse_of[i]] for i in range(len(fine_names))]

    def _decode(self, archive: Path) -> dict[str, np.ndarray]:
        parts: dict[str, Any] = {}
        with tarfile.open(archive, "r:gz") as tar:
            for name in ("train", "test", "meta"):
                try:
                    member = tar.extractfile(f"cifar-100-python/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise ValueError(
                        f"{type(self).__name__}: {archive} has no cifar-100-python/{name}; it "
                        "is not CIFAR-100's python archive. Delete it and download again"
                    )
                with member:
                    parts[name] = _plain_keys(pickle.load(member, encoding="bytes"))  # noqa: S301
        meta = parts["meta"]
        return {
            "images": np.concatenate(
                [np.asarray(parts[s]["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                 for s in ("train", "test")]
            ),
            "fine": np.concatenate(
                [np.asarray(parts[s]["fine_labels"]) for s in ("train", "test")]
            ),
            "coarse": np.concatenate(
                [np.asarray(parts[s]["coarse_labels"]) for s in ("train", "test")]
            ),
            "fine_names": np.asarray([_plain_keys(n) for n in meta["fine_label_names"]]),
            "coarse_names": np.asarray([_plain_keys(n) for n in meta["coarse_label_names"]]),
        }  # fmt: skip


class CIFARFS(_CIFAR100FewShot):
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's classes split 64/16/20.

    Reads ``cifar-100-python.tar.gz`` (www.cs.toronto.edu/~kriz) in ``root/cifar100/``
    (``download=True`` fetches it and checks its published MD5); all 600 images of each
    class (train and test files together), ``[3, 32, 32]`` floats in ``[0, 1]``. The split
    is torchmeta's copy (``fastmeta/data/splits/cifar_fs.json``). Arguments as
    :class:`MiniImagenet`, files under ``root/cifar100/``.

    Raises:
        FileNotFoundError: If the archive is missing and ``download`` is false.
        ConnectionError: If a download fails.
        ValueError: If the archive's MD5 or contents are wrong.

    References:
        Bertinetto, Henriques, Torr, Vedaldi, "Meta-learning with differentiable
        closed-form solvers", ICLR 2019.
    """

    def _splits(self, classes: list[str], coarse: list[str]) -> dict[str, list[str]]:
        table = load_split("cifar_fs")
        return {s: [f"{c}/{f}" for c, f in table[s]] for s in ("train", "val", "test")}


class FC100(_CIFAR100FewShot):
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 12/4/4 (60/20/20 classes).

    Same archive and arguments as :class:`CIFARFS`; the superclass split is torchmeta's
    copy (``fastmeta/data/splits/fc100.json``). Tasks are N-way over the fine classes of
    the split's superclasses.

    Raises:
        FileNotFoundError: If the archive is missing and ``download`` is false.
        ConnectionError: If a download fails.
        ValueError: If the archive's MD5 or contents are wrong.

    References:
        Oreshkin, Rodríguez López, Lacoste, "TADAM: Task dependent adaptive metric for
        improved few-shot learning", NeurIPS 2018.
    """

    def _splits(self, classes: list[str], coarse: list[str]) -> dict[str, list[str]]:
        table = load_split("fc100")
        known = set(coarse)
        for split in ("train", "val", "test"):
            for name in table[split]:
                if name not in known:
                    raise ValueError(
                        f"FC100: the data under {self.root} has no superclass {name!r}; the "
                        "archive is not the published one. Delete cifar100.npz and the "
                        "archive, and download again"
                    )
        return {
            s: [c for c, sup in zip(classes, coarse, strict=True) if sup in table[s]]
            for s in ("train", "val", "test")
        }


__all__ = ["CIFARFS", "FC100", "MiniImagenet", "Omniglot"]
