"""``--seeds N``: independent seeds, each its own checkpoint, and results across seeds."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from fastmeta.bench import load_checkpoint
from fastmeta.bench._seeds import across_seeds, t95
from fastmeta.bench.digits import DigitsConfig, run_digits
from fastmeta.bench.sine import SineConfig, run_sine
from fastmeta.cli import main

DIGITS = {"algorithms": ("maml", "fomaml"), "shots": (1,), "iterations": 3,
          "meta_batch_size": 2, "eval_tasks": 4, "eval_steps": 1, "hidden": 4, "query": 2,
          "checkpoint_every": 2}


def _quiet(_: str) -> None:
    pass


def _cell(mean: float | None, median: float, diverged: int = 0) -> dict:
    return {"mean": mean, "ci95": 0.1, "median": median, "diverged": diverged, "tasks": 10}


def test_across_seeds_is_a_student_t_interval_over_the_seed_means() -> None:
    cells = [_cell(0.5, 0.4), _cell(0.6, 0.7, diverged=1), _cell(0.7, 0.5)]
    found = across_seeds(cells)
    assert found["mean"] == pytest.approx(0.6)
    assert found["ci95"] == pytest.approx(4.303 * statistics.stdev([0.5, 0.6, 0.7]) / math.sqrt(3))
    assert found["median"] == 0.5 and found["diverged"] == 1 and found["tasks"] == 30
    assert found["per_seed"] == [0.5, 0.6, 0.7] and found["seeds"] == 3
    assert t95(1) == 12.706 and t95(100) == 1.96
    alone = across_seeds([_cell(None, math.inf, diverged=10), _cell(0.3, 0.3)])
    assert alone["mean"] == 0.3 and alone["ci95"] == 0.0 and alone["diverged"] == 10


def test_digits_seeds_train_each_seed_like_a_run_of_that_seed(tmp_path: Path) -> None:
    config = DigitsConfig(**DIGITS, seeds=2)
    results = run_digits(config, tmp_path / "two", progress=False, plots=False, log=_quiet)
    names = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert names == ["fomaml-1shot-seed0.pt", "fomaml-1shot-seed1.pt", "maml-1shot-seed0.pt",
                     "maml-1shot-seed1.pt"]
    payload = load_checkpoint(tmp_path / "two" / "checkpoints" / "maml-1shot-seed1.pt")
    assert payload["metadata"]["config"]["seed"] == 1
    single = run_digits(DigitsConfig(**DIGITS, seed=1), tmp_path / "one", progress=False,
                        plots=False, log=_quiet)
    maml = results["algorithms"]["maml"]
    assert maml["seeds"]["1"]["evaluation"] == single["algorithms"]["maml"]["evaluation"]
    assert maml["seeds"]["0"]["evaluation"] != maml["seeds"]["1"]["evaluation"]
    last = maml["across_seeds"]["1-shot"]["summaries"][-1]
    means = [maml["seeds"][s]["evaluation"]["1-shot"]["summaries"][-1]["mean"] for s in "01"]
    assert last["per_seed"] == means and last["mean"] == pytest.approx(sum(means) / 2)
    text = (tmp_path / "two" / "results.md").read_text()
    assert text.startswith("# fastmeta bench digits, 2 seeds")
    assert "## Across seeds" in text and "| maml | 1-shot, 1 steps |" in text
    assert text.count("## fastmeta bench digits") == 2  # one section per seed


def test_seeds_resume_and_refuse_a_changed_seed_count(tmp_path: Path) -> None:
    config = DigitsConfig(**DIGITS, seeds=2)
    first = run_digits(config, tmp_path, progress=False, plots=False, log=_quiet)
    again = run_digits(config, tmp_path, resume=True, progress=False, plots=False, log=_quiet)
    assert again["algorithms"] == first["algorithms"]
    with pytest.raises(Exception, match="different settings"):
        run_digits(config.replace(seeds=3, algorithms=("maml",)), tmp_path, resume=True,
                   progress=False, plots=False, log=_quiet)


def test_sine_seeds_with_figures_of_the_first_seed(tmp_path: Path) -> None:
    config = SineConfig(algorithms=("maml", "random"), iterations=4, meta_batch_size=3,
                        train_shots=4, eval_shots=(3,), eval_steps=1, eval_tasks=5,
                        eval_query=6, checkpoint_every=5, seeds=2)
    results = run_sine(config, tmp_path, progress=False, log=_quiet)
    assert set(results["per_seed_summary"]) == {"0", "1"}
    assert (tmp_path / "fine_tuning_curves.png").is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["seeds"] == 2
    text = (tmp_path / "results.md").read_text()
    assert "| maml | 3, 1 steps |" in text
    assert text.count("## fastmeta bench sine") == 2 and text.count("![") == 3  # figures once


def test_seeds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="seeds must be >= 1, got 0"):
        DigitsConfig(seeds=0)
    with pytest.raises(SystemExit):
        main(["bench", "sine", "--seeds", "0"])
    assert "seeds" in capsys.readouterr().err


def test_sine_states_each_paper_cell_across_seeds():
    from fastmeta.bench.sine import against_paper

    def cell(means):
        return {"mean": sum(means) / len(means), "per_seed": means, "seeds": len(means)}

    summaries = [cell([3.0, 3.0])] + [cell([0.6, 0.7])] + [cell([1.0, 1.0])] * 4 + \
        [cell([0.3, 0.5])] * 5
    results = {"algorithms": {"maml": {"across_seeds": {"curves": {"5": {
        "steps": list(range(11)), "summaries": summaries}}}}}}
    lines = against_paper(results)
    assert "- maml, 1 step: 1 of 2 seeds at or below the paper's 0.67" in lines[2]
    assert "0.650, is at or below it" in lines[2]
    assert "maml, 5 steps: 0 of 2 seeds" in lines[3] and "is above it" in lines[3]
    assert "maml, 10 steps: 1 of 2 seeds" in lines[4] and "0.400, is above it" in lines[4]
    assert against_paper({"algorithms": {}}) == []
