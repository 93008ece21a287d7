"""``fastmeta bench omniglot``: MAML's Omniglot protocol on ``fastmeta.data.Omniglot``.

5-way 1-shot by default, as in the MAML paper (Finn, Abbeel, Levine 2017, §5.2) and its
reference code (github.com/cbfinn/maml, ``main.py``): Conv-4 with 64 channels, one inner
SGD step α = 0.4 in training, meta-batch 32, 40,000 meta-iterations, one query image per
class (the reference code draws ``2·K`` images per class), 10 fine-tuning steps at test;
the Vinyals et al. 2016 character split with rotations as classes, 28x28 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data import FewShotDataset, Omniglot
from ._config import setting
from ._vision import VisionConfig, VisionSpec, make_benchmark, splitter


@dataclass(frozen=True)
class OmniglotConfig(VisionConfig):
    """Settings of ``fastmeta bench omniglot``; every field is a command-line flag."""

    iterations: int = setting(40_000, "meta-iterations per algorithm")


def _make(config: Any, split: str, seed: int) -> FewShotDataset:
    return Omniglot(config.root, config.ways, meta_split=split, download=bool(config.download),
                    dataset_transform=splitter(config), image_size=28, seed=seed)


SPEC = VisionSpec(
    name="omniglot",
    title="Omniglot",
    in_channels=1,
    image_size=28,
    make=_make,
    published={(5, 1): {"maml": (98.7, 0.4)}, (5, 5): {"maml": (99.9, 0.1)},
               (20, 1): {"maml": (95.8, 0.3)}, (20, 5): {"maml": (98.9, 0.2)}},
    protocol="The MAML paper's protocol (5-way: Conv-4, 64 channels, 1 inner step α = 0.4, "
    "meta-batch 32; the Vinyals et al. 2016 split, 1028/172/423 characters, rotations "
    "as classes, 28x28 images).",
)

QUICK = {"iterations": 300, "eval_tasks": 100, "checkpoint_every": 100}

BENCHMARK = make_benchmark(
    SPEC, OmniglotConfig, QUICK,
    help="Omniglot few-shot classification, the MAML paper's protocol (needs the archives)",
    description="N-way K-shot classification of held-out Omniglot characters "
    "(fastmeta.data.Omniglot under --root; --download 1 fetches the two archives).",
)
