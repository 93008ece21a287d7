"""Honest summaries: bounded blow-ups count as diverged; tables lead with the median."""

from __future__ import annotations

import math
import re

import pytest

from fastmeta.bench import summarize
from fastmeta.bench._stats import format_median_cell
from fastmeta.bench.sine import SineConfig, markdown


def test_a_finite_blow_up_above_the_bound_counts_as_diverged():
    before = [1.0, 1.0, 2.0, 1.0, 1.0]
    summary = summarize([0.5, 1e31, 150.0, 0.3, math.inf], before=before, bound=100.0)
    assert summary["diverged"] == 2  # 1e31 > 100·1 and inf; 150 <= 100·2 is kept
    assert summary["mean"] == pytest.approx((0.5 + 150.0 + 0.3) / 3)
    assert summary["median"] == 150.0  # diverged tasks rank above every kept one
    assert summary["bound"] == 100.0 and summary["tasks"] == 5


def test_without_before_only_non_finite_values_diverge():
    summary = summarize([0.5, 1e31, math.nan])
    assert summary["diverged"] == 1 and summary["bound"] is None
    assert summary["mean"] == pytest.approx((0.5 + 1e31) / 2)


def test_before_must_hold_one_loss_per_task():
    with pytest.raises(ValueError, match=r"before must hold one loss per task \(3\), got "
                                         r"shape \(2,\); pass the per-task losses"):
        summarize([1.0, 2.0, 3.0], before=[1.0, 1.0])


def test_the_median_cell_leads_with_the_median_and_says_when_tasks_diverged():
    assert format_median_cell(summarize([0.1, 0.2, 0.3])) == "0.200 (0.200 ± 0.113)"
    cell = format_median_cell(summarize([0.1, 0.2, 1e9], before=[1.0] * 3))
    assert cell == "0.200 (0.150 ± 0.098), 1/3 diverged"
    most = summarize([1e9, 1e9, 0.1], before=[1.0] * 3)
    assert format_median_cell(most) == "diverged (0.100 ± 0.000), 2/3 diverged"
    assert format_median_cell({**most, "median": "inf"}).startswith("diverged")  # JSON


def _results(algorithms: dict[str, float], eval_steps: int = 10) -> dict:
    config = SineConfig(iterations=10, eval_tasks=4, eval_shots=(5,), eval_steps=eval_steps)
    blown = summarize([0.2, 0.3, 5e31, 0.4], before=[1.0] * 4)

    def evaluation(value: float) -> dict:
        cell = blown if value > 1e6 else summarize([value] * 4, before=[1.0] * 4)
        return {"curves": {"5": {"steps": list(range(eval_steps + 1)),
                                 "summaries": [cell] * (eval_steps + 1)}},
                "robustness": cell}

    return {
        "config": config.as_dict(),
        "versions": {"fastmeta": "0", "torch": "2", "torch_threads": 1},
        "wall_seconds": 1.0,
        "algorithms": {name: {"evaluation": evaluation(value),
                              "training": {"ms_per_iteration": 1.0, "seconds": 1.0}}
                       for name, value in algorithms.items()},
        "speed": {},
    }


def test_sine_results_md_has_no_blown_up_mean_and_says_what_diverged():
    text = markdown(_results({"maml": 0.4, "metasgd": 1e31, "transfer": 2.0}))
    means = [float(m) for m in re.findall(r"\(([-+0-9.e]+) ±", text)]
    assert means and max(means) < 1e6
    assert "| metasgd | 0.350 (0.300 ± 0.113), 1/4 diverged |" in text
    assert text.count("Evaluated beyond their training") == 1
    assert "maml, metasgd with 1 inner step" in text and "Meta-SGD repeat" in text
    assert "more than 100× its query MSE before fine-tuning" in text
    assert "iMAML" not in text and "MAML++" not in text  # neither was run


def test_sine_results_md_names_no_algorithm_beyond_training_when_steps_match():
    text = markdown(_results({"maml": 0.4, "transfer": 2.0}, eval_steps=1))
    assert "Evaluated beyond their training" not in text


def test_results_files_get_the_mode_of_any_new_file(tmp_path):
    import os
    import stat

    from fastmeta.bench._outdir import write_text

    write_text(tmp_path / "results.md", "# results\n")
    (tmp_path / "figure.png").write_bytes(b"")  # as matplotlib creates a figure
    mode = stat.S_IMODE(os.stat(tmp_path / "results.md").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "figure.png").st_mode)
    assert mode & stat.S_IRGRP or os.umask(os.umask(0)) & 0o040  # readable unless umask says no


def test_the_line_after_training_says_its_loss_is_a_window_mean_and_its_time_a_median():
    from fastmeta.bench._runner import final_line
    from fastmeta.bench._train import TrainingRecord

    record = TrainingRecord(iterations=2000, loss_curve=[[1990, 0.5], [2000, 0.4178]],
                            step_ms=[20.0, 21.03, 30.0])
    assert final_line("mamlpp", record) == (
        "mamlpp: 2,000 meta-iterations; meta-loss 0.4178 (mean of the last 10); 21.03 ms per "
        "meta_step (median, without data loading and checkpoints)")


def test_a_run_directory_given_as_checkpoint_lists_every_checkpoint(tmp_path):
    from fastmeta.bench import load_checkpoint
    from fastmeta.bench._checkpoint import CheckpointError

    names = ["anil", "fomaml", "maml", "mamlpp", "metasgd", "random", "reptile", "transfer"]
    (tmp_path / "checkpoints").mkdir()
    for name in names:
        (tmp_path / "checkpoints" / f"{name}.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a directory; pass one of its checkpoint") as info:
        load_checkpoint(tmp_path)
    assert all(f"{name}.pt" in str(info.value) for name in names)


def test_medians_read_back_from_json_as_strings_are_shown_as_diverged():
    from fastmeta.bench._seeds import across_seeds
    from fastmeta.bench._stats import format_median

    cells = [{"mean": 0.3, "ci95": 0.1, "median": "inf", "diverged": 6, "tasks": 10},
             {"mean": 0.2, "ci95": 0.1, "median": "inf", "diverged": 7, "tasks": 10},
             {"mean": 0.4, "ci95": 0.1, "median": 0.5, "diverged": 0, "tasks": 10}]
    combined = across_seeds(cells)
    assert combined["median"] == math.inf and combined["diverged"] == 13
    assert format_median(combined["median"]) == "diverged"
    assert format_median("nan") == "diverged" and format_median(0.25) == "0.250"
