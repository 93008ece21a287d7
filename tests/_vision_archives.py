"""Tiny archives in the published formats of the vision datasets, for the tests."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from fastmeta.data._vision import load_split


def omniglot_zips(folder: Path) -> dict[str, Path]:
    """The two Omniglot archives: every character of the split, two 12x12 drawings each."""
    from PIL import Image

    table = load_split("omniglot_vinyals")
    rng = np.random.default_rng(0)
    paths = {}
    for part in ("images_background", "images_evaluation"):
        path = folder / f"{part}.zip"
        with zipfile.ZipFile(path, "w") as zipped:
            for name in sorted(c for s in ("train", "val", "test") for c in table[s]):
                if not name.startswith(part + "/"):
                    continue
                for k in range(2):
                    stroke = rng.integers(0, 2, size=(12, 12)).astype(np.uint8) * 255
                    buffer = io.BytesIO()
                    Image.fromarray(255 - stroke).save(buffer, format="PNG")  # black ink
                    zipped.writestr(f"{name}/{k:04d}_{k + 1:02d}.png", buffer.getvalue())
        paths[part] = path
    return paths



def mini_pickles(folder: Path, classes_per_split: int = 6, per_class: int = 2) -> None:
    rng = np.random.default_rng(1)
    for split_index, split in enumerate(("train", "val", "test")):
        names = [f"n0{split_index}{c:06d}" for c in range(classes_per_split)]
        count = classes_per_split * per_class
        data = {
            "image_data": rng.integers(0, 256, size=(count, 84, 84, 3), dtype=np.uint8),
            "class_dict": {
                n: list(range(i * per_class, (i + 1) * per_class)) for i, n in enumerate(names)
            },
        }
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as stream:
            pickle.dump(data, stream)
