"""Integration: a learner's ``meta_step`` consumes a batch from every fastmeta.data loader."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import fastmeta
from fastmeta.data import (
    BatchMetaDataLoader,
    ClassSplitter,
    FewShotDataset,
    FewShotImageFolder,
    Harmonic,
    Rotation,
    Sinusoid,
    SinusoidAndLine,
    sinusoid,
)

if not hasattr(fastmeta, "MAML"):
    pytest.skip("fastmeta.MAML is not available in this checkout", allow_module_level=True)

WAYS, SHOTS, QUERIES = 3, 1, 2


def _mlp(inputs: int = 1, outputs: int = 1) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, outputs))


def _conv(size: int = 8) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, WAYS)
    )


def _splitter() -> ClassSplitter:
    return ClassSplitter(num_train_per_class=SHOTS, num_test_per_class=QUERIES)


def _points() -> TensorDataset:
    labels = torch.arange(12).repeat_interleave(6)
    noise = torch.randn(len(labels), 5, generator=torch.Generator().manual_seed(0))
    return TensorDataset(noise + labels[:, None].float(), labels)


class _TorchmetaStyle:
    """A user's torchmeta-style meta-dataset: OrderedDict of TensorDatasets."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> OrderedDict[str, TensorDataset]:
        x = torch.linspace(-1, 1, 6).reshape(6, 1) + index
        return OrderedDict(
            [("train", TensorDataset(x[:3], 2 * x[:3])), ("test", TensorDataset(x[3:], 2 * x[3:]))]
        )


def _digits() -> Any:
    pytest.importorskip("sklearn")
    from fastmeta.data import Digits

    return Digits(WAYS, meta_split="train", dataset_transform=_splitter(), seed=0)


def _image_folder(root: Path) -> Any:
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for c in range(5):
        (root / f"alphabet/char{c}").mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
            image_module.fromarray(pixels).save(root / f"alphabet/char{c}/{k}.png")
    return FewShotImageFolder(
        root,
        WAYS,
        meta_split="train",
        class_splits=(1, 0, 0),
        dataset_transform=_splitter(),
        class_augmentations=[Rotation([90])],
        seed=0,
    )


REGRESSION: dict[str, Callable[[], Any]] = {
    "sinusoid": lambda: sinusoid(5, seed=0),
    "reptile-grid": lambda: sinusoid(5, test_shots=50, preset="reptile", query_grid=True, seed=0),
    "robustness": lambda: sinusoid(5, test_shots=20, support_range=(0, 5), seed=0),
    "support-query-keys": lambda: Sinusoid(
        8,
        dataset_transform=ClassSplitter(num_support_per_class=4, num_query_per_class=4),
        seed=0,
    ),
    "harmonic": lambda: Harmonic(8, dataset_transform=_splitter_regression(), seed=0),
    "sinusoid-and-line": lambda: SinusoidAndLine(
        8, dataset_transform=_splitter_regression(), seed=0
    ),
    "torchmeta-style": _TorchmetaStyle,
}


def _splitter_regression() -> ClassSplitter:
    return ClassSplitter(num_train_per_class=4, num_test_per_class=4)


def _check_meta_step(model: nn.Module, batch: Any, **options: Any) -> None:
    learner = fastmeta.MAML(model, inner_lr=0.01, **options)
    result = learner.meta_step(batch, torch.optim.Adam(learner.parameters(), 1e-3))
    assert isinstance(result.loss, float) and math.isfinite(result.loss)


@pytest.mark.parametrize("name", list(REGRESSION))
def test_regression_batch_feeds_meta_step(name: str) -> None:
    batch = next(iter(BatchMetaDataLoader(REGRESSION[name](), batch_size=2)))
    _check_meta_step(_mlp(), batch)


def test_feature_classification_batch_feeds_meta_step() -> None:
    tasks = FewShotDataset(_points(), WAYS, meta_split="train", dataset_transform=_splitter())
    batch = next(iter(BatchMetaDataLoader(tasks, batch_size=2)))
    _check_meta_step(_mlp(5, WAYS), batch, loss_fn=F.cross_entropy)


def test_digits_batch_feeds_meta_step() -> None:
    batch = next(iter(BatchMetaDataLoader(_digits(), batch_size=2)))
    _check_meta_step(_conv(), batch, loss_fn=F.cross_entropy)


def test_image_folder_batch_feeds_meta_step(tmp_path: Path) -> None:
    batch = next(iter(BatchMetaDataLoader(_image_folder(tmp_path), batch_size=2)))
    _check_meta_step(_conv(), batch, loss_fn=F.cross_entropy)
