"""The vision suite: Omniglot, MiniImagenet, CIFARFS, FC100 from tiny archives in the real formats.

Each fixture writes the archive its authors distribute (the Omniglot zips, the
mini-imagenet cache pickles and their tar.gz, CIFAR-100's python tar.gz) with every
class of the published split but a few small images per class; the tests read them
through ``ClassSplitter`` and ``BatchMetaDataLoader`` into ``MAML.meta_step``, and
check downloads against a replaced URL opener.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
import urllib.error
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fastmeta
from fastmeta.data import (
    CIFARFS,
    FC100,
    BatchMetaDataLoader,
    ClassSplitter,
    MiniImagenet,
    Omniglot,
    _download,
)
from fastmeta.data._vision import load_split
from fastmeta.models import Conv4
from tests._vision_archives import mini_pickles, omniglot_zips

pytest.importorskip("PIL.Image")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _splitter() -> ClassSplitter:
    return ClassSplitter(num_train_per_class=1, num_test_per_class=1)


def _meta_step(tasks: Any, channels: int, size: int) -> float:
    batch = next(iter(BatchMetaDataLoader(tasks, batch_size=2)))
    assert batch["train"][0].shape == (2, 5, channels, size, size)
    assert batch["train"][0].dtype == torch.float32
    assert float(batch["train"][0].min()) >= 0.0 and float(batch["train"][0].max()) <= 1.0
    assert batch["test"][1].shape == (2, 5)
    torch.manual_seed(0)
    model = Conv4(in_channels=channels, num_classes=5, hidden=4, image_size=size)
    learner = fastmeta.MAML(model, inner_lr=0.4, loss_fn="cross_entropy", engine="higher")
    before = [p.detach().clone() for p in model.parameters()]
    result = learner.meta_step(batch, torch.optim.SGD(model.parameters(), lr=0.1))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    loss = float(result.loss)
    assert np.isfinite(loss)
    return loss


# ---------------------------------------------------------------- Omniglot


@pytest.fixture(scope="module")
def omniglot_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return omniglot_zips(tmp_path_factory.mktemp("omniglot-archives"))


@pytest.fixture
def omniglot_root(
    tmp_path: Path, omniglot_archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Path:
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for path in omniglot_archives.values():
        shutil.copy(path, folder / path.name)
    monkeypatch.setattr(
        Omniglot, "zips_md5", {part: _md5(path) for part, path in omniglot_archives.items()}
    )
    return tmp_path


def test_omniglot_split_is_vinyals_1028_172_423() -> None:
    table = load_split("omniglot_vinyals")
    sizes = [len(table[s]) for s in ("train", "val", "test")]
    assert sizes == [1028, 172, 423]
    assert len({c for s in ("train", "val", "test") for c in table[s]}) == 1623
    assert all(c.startswith("images_background/") for c in table["val"])
    assert all(c.startswith("images_evaluation/") for c in table["test"])
    assert "Vinyals" in table["source"] and "torchmeta" in table["source"]


def test_omniglot_rotations_are_classes_and_batches_meta_step(omniglot_root: Path) -> None:
    tasks = Omniglot(omniglot_root, 5, meta_train=True, dataset_transform=_splitter(), seed=0)
    assert tasks.dataset.num_classes == 1028 and len(tasks.dataset) == 4 * 1028
    assert (omniglot_root / "omniglot" / "omniglot_28.npz").is_file()
    _meta_step(tasks, channels=1, size=28)
    plain = Omniglot(omniglot_root, 5, meta_split="test", rotations=False, image_size=16)
    assert len(plain.dataset) == 423
    rotated = tasks.dataset[1028 + 3][0][0]  # character 3 turned by 90 degrees
    assert torch.equal(rotated, torch.rot90(tasks.dataset[3][0][0], 1, dims=(-2, -1)))


def test_omniglot_images_are_inverted_strokes(omniglot_root: Path) -> None:
    tasks = Omniglot(omniglot_root, 5, meta_split="val", image_size=12, rotations=False)
    from PIL import Image

    with zipfile.ZipFile(omniglot_root / "omniglot" / "images_background.zip") as zipped:
        name = tasks.dataset.labels[0]
        character = tasks.dataset.dataset.classes[name]
        members = sorted(m for m in zipped.namelist() if m.startswith(character + "/"))
        raw = np.asarray(Image.open(io.BytesIO(zipped.read(members[0]))).convert("L"))
    image, _ = tasks.dataset[0][0]
    assert torch.allclose(image[0], torch.from_numpy(255 - raw).float() / 255)


def test_omniglot_background_evaluation_split(omniglot_root: Path) -> None:
    train = Omniglot(omniglot_root, 5, meta_split="train", use_vinyals_split=False)
    assert train.dataset.num_classes == 964  # the characters of images_background
    with pytest.raises(ValueError, match="use_vinyals_split=True"):
        Omniglot(omniglot_root, 5, meta_split="val", use_vinyals_split=False)


def test_omniglot_missing_archive_names_url_and_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images_background\.zip not found.*download=True"):
        Omniglot(tmp_path, 5, meta_split="train")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        Omniglot(tmp_path, 5, meta_split="train", image_size=0)


def test_omniglot_wrong_md5_is_an_error(
    omniglot_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Omniglot, "zips_md5", {**Omniglot.zips_md5, "images_evaluation": "0" * 32})
    with pytest.raises(ValueError, match=r"images_evaluation\.zip has MD5 [0-9a-f]{32}.*Delete it"):
        Omniglot(omniglot_root, 5, meta_split="train")


def _serve(files: dict[str, bytes], seen: list[str]) -> Callable[..., Any]:
    def urlopen(url: str, timeout: float) -> io.BytesIO:
        seen.append(url)
        if url not in files:
            raise urllib.error.URLError("no route to host")
        return io.BytesIO(files[url])

    return urlopen


def test_omniglot_download_fetches_both_archives(
    tmp_path: Path, omniglot_archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {f"{Omniglot.url_prefix}/{p.name}": p.read_bytes() for p in omniglot_archives.values()}
    seen: list[str] = []
    monkeypatch.setattr(_download, "urlopen", _serve(files, seen))
    monkeypatch.setattr(
        Omniglot, "zips_md5", {part: _md5(path) for part, path in omniglot_archives.items()}
    )
    tasks = Omniglot(tmp_path, 5, meta_split="test", download=True)
    assert sorted(seen) == sorted(files)
    assert seen[0].startswith("https://github.com/brendenlake/omniglot/raw/master/python/")
    assert tasks.dataset.num_classes == 423
    assert not list((tmp_path / "omniglot").glob("*.part"))


def test_download_offline_and_corrupt_give_manual_instructions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_download, "urlopen", _serve({}, []))
    with pytest.raises(
        ConnectionError,
        match=r"could not download https://github\.com/brendenlake.*by hand.*background\.zip",
    ):
        Omniglot(tmp_path, 5, meta_split="train", download=True)
    url = f"{Omniglot.url_prefix}/images_background.zip"
    monkeypatch.setattr(_download, "urlopen", _serve({url: b"<html>rate limited</html>"}, []))
    with pytest.raises(ValueError, match="has MD5"):
        Omniglot(tmp_path, 5, meta_split="train", download=True)
    assert not list((tmp_path / "omniglot").iterdir())  # the bad download is not kept


# ---------------------------------------------------------------- miniImageNet


def test_miniimagenet_pickles_meta_step(tmp_path: Path) -> None:
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    mini_pickles(folder)
    tasks = MiniImagenet(tmp_path, 5, meta_val=True, dataset_transform=_splitter(), seed=0)
    assert tasks.dataset.num_classes == 6
    assert all(name.startswith("n01") for name in tasks.dataset.dataset.classes)
    with open(folder / "mini-imagenet-cache-val.pkl", "rb") as stream:
        raw = pickle.load(stream)
    first = raw["class_dict"][tasks.dataset.dataset.classes[0]][0]
    image, _ = tasks.dataset.dataset[first]
    assert torch.allclose(image, torch.from_numpy(raw["image_data"][first]).permute(2, 0, 1) / 255)
    _meta_step(tasks, channels=3, size=84)


def test_miniimagenet_download_extracts_the_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    mini_pickles(staging, classes_per_split=5)
    archive = tmp_path / "mini-imagenet.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(staging.iterdir()):
            tar.add(path, arcname=path.name)
    seen: list[str] = []
    monkeypatch.setattr(
        _download, "urlopen", _serve({MiniImagenet.url: archive.read_bytes()}, seen)
    )
    monkeypatch.setattr(MiniImagenet, "archive_md5", _md5(archive))
    root = tmp_path / "cache"
    tasks = MiniImagenet(root, 5, meta_split="test", download=True, dataset_transform=_splitter())
    assert seen == [MiniImagenet.url] and MiniImagenet.gdrive_id in seen[0]
    assert sorted(p.name for p in (root / "miniimagenet").glob("*.pkl")) == [
        f"mini-imagenet-cache-{s}.pkl" for s in ("test", "train", "val")
    ]
    assert len(tasks.dataset) == 5


def test_miniimagenet_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"mini-imagenet-cache-train\.pkl.*drive\.google\.com.*download=False",
    ):
        MiniImagenet(tmp_path, 5, meta_split="train")
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as stream:
        pickle.dump({"image_data": np.zeros((2, 84, 84), dtype=np.uint8), "class_dict": {}}, stream)
    with pytest.raises(
        ValueError,
        match=r"train\.pkl is not a mini-imagenet cache pickle: image_data is uint8 \[2, 84, 84\]",
    ):
        MiniImagenet(tmp_path, 5, meta_split="train")


# ---------------------------------------------------------------- CIFAR-FS and FC100


def _cifar_archive(path: Path, per_class: tuple[int, int] = (1, 1)) -> Path:
    """CIFAR-100's python archive, as Python 2 pickled it: bytes keys and names."""
    pairs = sorted({(c, f) for s in ("train", "val", "test") for c, f in load_split("cifar_fs")[s]})
    fine_names = sorted(f for _, f in pairs)
    coarse_names = sorted({c for c, _ in pairs})
    coarse_of = {f: coarse_names.index(c) for c, f in pairs}
    rng = np.random.default_rng(2)
    members = {}
    for part, count in zip(("train", "test"), per_class, strict=True):
        fine = [i for i in range(len(fine_names)) for _ in range(count)]
        members[part] = {
            b"data": rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8),
            b"fine_labels": fine,
            b"coarse_labels": [coarse_of[fine_names[i]] for i in fine],
            b"filenames": [b"x.png"] * len(fine),
        }
    members["meta"] = {
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [n.encode() for n in coarse_names],
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            payload = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cifar100"
    folder.mkdir()
    archive = _cifar_archive(folder / "cifar-100-python.tar.gz")
    monkeypatch.setattr(CIFARFS, "archive_md5", _md5(archive))
    monkeypatch.setattr(FC100, "archive_md5", _md5(archive))
    return tmp_path


def test_cifar_fs_split_64_16_20_and_meta_step(cifar_root: Path) -> None:
    sizes = [
        CIFARFS(cifar_root, 5, meta_split=s).dataset.num_classes for s in ("train", "val", "test")
    ]
    assert sizes == [64, 16, 20]
    tasks = CIFARFS(cifar_root, 5, meta_split="train", dataset_transform=_splitter(), seed=0)
    names = {tasks.dataset.dataset.classes[label] for label in tasks.dataset.labels}
    assert "aquatic_mammals/dolphin" in names and "aquatic_mammals/whale" not in names
    _meta_step(tasks, channels=3, size=32)


def test_cifar_images_keep_the_archive_layout(cifar_root: Path) -> None:
    tasks = CIFARFS(cifar_root, 5, meta_split="test")
    with tarfile.open(cifar_root / "cifar100" / "cifar-100-python.tar.gz") as tar:
        member = tar.extractfile("cifar-100-python/train")
        assert member is not None
        train = pickle.load(member, encoding="bytes")
    label = tasks.dataset.labels[0]
    row = train[b"fine_labels"].index(label)  # first image of that class: in the train file
    expected = torch.from_numpy(train[b"data"][row].reshape(3, 32, 32)).float() / 255
    assert torch.equal(tasks.dataset.dataset[row][0], expected)
    assert len(tasks.dataset[0]) == 2  # train and test images of the class together


def test_fc100_splits_by_superclass(cifar_root: Path) -> None:
    table = load_split("fc100")
    superclasses = {}
    for split in ("train", "val", "test"):
        tasks = FC100(cifar_root, 5, meta_split=split)
        names = [tasks.dataset.dataset.classes[label] for label in tasks.dataset.labels]
        superclasses[split] = {n.split("/")[0] for n in names}
        assert len(names) == 5 * len(table[split])
    assert [len(superclasses[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert superclasses["test"] == set(table["test"])
    tasks = FC100(cifar_root, 5, meta_split="val", dataset_transform=_splitter(), seed=0)
    _meta_step(tasks, channels=3, size=32)


def test_cifar_download_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _cifar_archive(tmp_path / "served.tar.gz")
    seen: list[str] = []
    monkeypatch.setattr(_download, "urlopen", _serve({CIFARFS.url: archive.read_bytes()}, seen))
    monkeypatch.setattr(FC100, "archive_md5", _md5(archive))
    root = tmp_path / "data"
    assert FC100(root, 5, meta_split="test", download=True).dataset.num_classes == 20
    assert seen == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]
    with pytest.raises(
        FileNotFoundError,
        match=r"CIFARFS: .*cifar-100-python\.tar\.gz not found.*www\.cs\.toronto\.edu",
    ):
        CIFARFS(tmp_path / "elsewhere", 5, meta_split="train")
    bad = tmp_path / "bad" / "cifar100"
    bad.mkdir(parents=True)
    with tarfile.open(bad / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("something/else"), io.BytesIO(b""))
    monkeypatch.setattr(CIFARFS, "archive_md5", None)
    with pytest.raises(
        ValueError, match=r"has no cifar-100-python/train; it is not CIFAR-100's python archive"
    ):
        CIFARFS(tmp_path / "bad", 5, meta_split="train")


def test_split_files_name_their_sources() -> None:
    for name in ("omniglot_vinyals", "cifar_fs", "fc100"):
        table = load_split(name)
        assert "tristandeleu/pytorch-meta" in table["source"], name
    shipped = Path(fastmeta.data.__file__).parent / "splits" / "fc100.json"
    assert json.loads(shipped.read_text())["train"][0] == "fish"
