"""``fastmeta bench miniimagenet``: MAML's miniImageNet protocol on ``fastmeta.data.MiniImagenet``.

5-way 1-shot by default, as in the MAML paper (Finn, Abbeel, Levine 2017, §5.2) and its
reference code (github.com/cbfinn/maml, ``main.py``): Conv-4 with 32 channels, five inner
SGD steps α = 0.01 in training, meta-batch 4, 15 query images per class, 60,000
meta-iterations, 10 fine-tuning steps at test; the Ravi & Larochelle 2017 split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data import FewShotDataset, MiniImagenet
from ._config import setting
from ._vision import VisionConfig, VisionSpec, make_benchmark, splitter


@dataclass(frozen=True)
class MiniImagenetConfig(VisionConfig):
    """Settings of ``fastmeta bench miniimagenet``; every field is a command-line flag."""

    query: int = setting(15, "query images per class, in training and evaluation")
    iterations: int = setting(60_000, "meta-iterations per algorithm")
    meta_batch_size: int = setting(4, "tasks per meta-iteration")
    hidden: int = setting(32, "channels of the Conv-4 backbone")
    inner_lr: float = setting(0.01, "inner SGD learning rate α (training and fine-tuning)")
    inner_steps: int = setting(5, "inner SGD steps in training")


def _make(config: Any, split: str, seed: int) -> FewShotDataset:
    return MiniImagenet(config.root, config.ways, meta_split=split,
                        download=bool(config.download), dataset_transform=splitter(config),
                        seed=seed)


SPEC = VisionSpec(
    name="miniimagenet",
    title="miniImageNet",
    in_channels=3,
    image_size=84,
    make=_make,
    published={(5, 1): {"maml": (48.70, 1.84), "fomaml": (48.07, 1.75)},
               (5, 5): {"maml": (63.11, 0.92), "fomaml": (63.15, 0.91)}},
    protocol="The MAML paper's protocol (Conv-4, 32 channels, 5 inner steps α = 0.01, "
    "meta-batch 4 for 1-shot, 15 query images per class; the Ravi & Larochelle 2017 split, "
    "64/16/20 classes, 84x84 images).",
)

QUICK = {"iterations": 200, "eval_tasks": 100, "checkpoint_every": 100}

BENCHMARK = make_benchmark(
    SPEC, MiniImagenetConfig, QUICK,
    help="miniImageNet few-shot classification, the MAML paper's protocol (needs the data)",
    description="N-way K-shot classification of held-out miniImageNet classes "
    "(fastmeta.data.MiniImagenet under --root; --download 1 fetches the archive).",
)
