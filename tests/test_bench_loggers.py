"""``fastmeta bench --log csv,tensorboard``: files the real tools read back."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fastmeta.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

TINY = ["bench", "sine", "--algorithms", "maml,fomaml", "--iterations", "8",
        "--meta-batch-size", "4", "--eval-tasks", "6", "--eval-shots", "3",
        "--eval-steps", "2", "--checkpoint-every", "4", "--no-plots", "--quiet"]


def test_bench_sine_log_tensorboard_writes_events_tensorboard_reads(tmp_path: Path) -> None:
    assert main([*TINY, "--out", str(tmp_path), "--log", "tensorboard,csv"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("maml", "fomaml"):
        events = EventAccumulator(str(tmp_path / "logs" / "tensorboard" / name))
        events.Reload()
        tags = events.Tags()
        curve = results["algorithms"][name]["training"]["loss_curve"]
        logged = events.Scalars("train/meta_loss")
        assert [e.step for e in logged] == [int(step) for step, _ in curve] == list(range(1, 9))
        assert [e.value for e in logged] == pytest.approx([loss for _, loss in curve])
        # the fine-tuning curve on 3-shot tasks: one point per fine-tuning step
        summaries = results["algorithms"][name]["evaluation"]["curves"]["3"]["summaries"]
        means = events.Scalars("eval/curves/3/mean")
        assert [e.step for e in means] == [0, 1, 2]
        assert [e.value for e in means] == pytest.approx([s["mean"] for s in summaries])
        assert {"engine", "config"} <= {t.split("/")[0] for t in tags["tensors"]}
    with open(tmp_path / "logs" / "csv" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    maml = [float(r["value"]) for r in rows if r["run"] == "maml" and r["tag"] == "train/meta_loss"]
    assert maml == pytest.approx([loss for _, loss in results["algorithms"]["maml"]["training"][
        "loss_curve"]])
    with open(tmp_path / "logs" / "csv" / "engines.csv") as file:
        engines = {r["run"]: r for r in csv.DictReader(file)}
    assert set(engines) == {"maml", "fomaml"} and engines["maml"]["reason"]
    with open(tmp_path / "logs" / "csv" / "config.csv") as file:
        config = {r["setting"]: json.loads(r["value"]) for r in csv.DictReader(file)}
    assert config["iterations"] == 8 and config["algorithms"] == ["maml", "fomaml"]


def test_an_unknown_log_format_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    with pytest.raises(SystemExit):
        main([*TINY, "--log", "wandb"])
    assert "expected formats from csv,tensorboard (comma-separated), got 'wandb'" in (
        capsys.readouterr().err)


def test_run_benchmark_checks_log_formats_before_training(tmp_path: Path) -> None:
    from fastmeta.bench import benchmark, run_benchmark

    sine = benchmark("sine")
    with pytest.raises(ValueError, match=r"log must be among \['csv', 'tensorboard'\].*'json'"):
        run_benchmark(sine, sine.config(iterations=2), tmp_path, log_to=("json",))
    assert not (tmp_path / "checkpoints").exists()
