"""``fastmeta bench omniglot`` and ``fastmeta bench miniimagenet`` end to end on tiny archives.

The archives hold every class of the published split with two small images each, so the
runs take seconds; full runs need the real datasets (see docs/guide/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fastmeta.bench import benchmark
from fastmeta.bench.miniimagenet import MiniImagenetConfig
from fastmeta.bench.omniglot import OmniglotConfig
from fastmeta.cli import main
from fastmeta.data import Omniglot
from tests._vision_archives import mini_pickles, omniglot_zips

pytest.importorskip("PIL.Image")

TINY = ["--iterations", "3", "--meta-batch-size", "2", "--hidden", "4", "--eval-tasks", "3",
        "--eval-steps", "2", "--checkpoint-every", "2", "--quiet", "--no-plots"]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


@pytest.fixture(scope="module")
def omniglot_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return omniglot_zips(tmp_path_factory.mktemp("omniglot-archives"))


def test_defaults_are_the_maml_papers_protocols() -> None:
    omniglot, mini = OmniglotConfig(), MiniImagenetConfig()
    assert (omniglot.ways, omniglot.shots, omniglot.hidden, omniglot.inner_steps,
            omniglot.inner_lr, omniglot.meta_batch_size) == (5, 1, 64, 1, 0.4, 32)
    assert (mini.ways, mini.shots, mini.hidden, mini.inner_steps, mini.inner_lr,
            mini.meta_batch_size, mini.query) == (5, 1, 32, 5, 0.01, 4, 15)
    assert omniglot.eval_tasks == mini.eval_tasks == 600
    with pytest.raises(ValueError, match="ways must be >= 2, got 1"):
        OmniglotConfig(ways=1)


def test_bench_omniglot_end_to_end_with_published_target(
    tmp_path: Path, omniglot_archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data" / "omniglot"
    data.mkdir(parents=True)
    for path in omniglot_archives.values():
        shutil.copy(path, data / path.name)
    monkeypatch.setattr(
        Omniglot, "zips_md5", {part: _md5(path) for part, path in omniglot_archives.items()}
    )
    out = tmp_path / "run"
    assert main(["bench", "omniglot", "--root", str(tmp_path / "data"), "--out", str(out),
                 *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["algorithms"]) == ["maml", "fomaml"]
    curve = results["algorithms"]["maml"]["evaluation"]["5-way 1-shot"]
    assert len(curve["summaries"]) == 3 and curve["summaries"][2]["tasks"] == 3
    assert 0.0 <= curve["summaries"][2]["mean"] <= 1.0
    assert results["published"]["maml"]["mean"] == 98.7
    text = (out / "results.md").read_text()
    assert "98.70 ± 0.40%" in text and "| fomaml |" in text
    assert (out / "checkpoints" / "maml.pt").is_file()
    # resumable: a second invocation with --resume evaluates the saved checkpoints again
    assert main(["bench", "omniglot", "--root", str(tmp_path / "data"), "--out", str(out),
                 "--resume", *TINY]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["algorithms"]["maml"]["evaluation"] == results["algorithms"]["maml"]["evaluation"]


def test_bench_miniimagenet_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "miniimagenet"
    folder.mkdir(parents=True)
    mini_pickles(folder, classes_per_split=6, per_class=3)
    out = tmp_path / "run"
    assert main(["bench", "miniimagenet", "--root", str(tmp_path / "data"), "--out", str(out),
                 "--query", "2", "--inner-steps", "2", "--algorithms", "fomaml", *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    summaries = results["algorithms"]["fomaml"]["evaluation"]["5-way 1-shot"]["summaries"]
    assert summaries[0]["tasks"] == 3
    assert results["published"]["fomaml"] == {"mean": 48.07, "ci95": 1.75,
                                              "source": "Finn et al. 2017, Table 1"}
    assert "48.07 ± 1.75%" in (out / "results.md").read_text()


def test_bench_without_data_says_where_to_put_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    status = main(["bench", "miniimagenet", "--root", str(tmp_path), "--out",
                   str(tmp_path / "run"), *TINY])
    assert status != 0
    error = capsys.readouterr().err
    assert "mini-imagenet-cache-train.pkl" in error and "download=True" in error


def test_registered() -> None:
    assert benchmark("omniglot").config is OmniglotConfig
    assert benchmark("miniimagenet").algorithms == ("maml", "fomaml")
