"""benchmarks/scaling.py: its options, its report, and (slow) one real tiny run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


def load_scaling() -> ModuleType:
    """Import the benchmark script as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("fastmeta_benchmark_scaling", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_round(rates: tuple[float, float, float]) -> dict[str, Any]:
    scaling = load_scaling()
    labels = [label for label, _, _ in scaling.configs(2)]
    comm = {"gradient_bytes": 7044, "buffer_bytes": 7276, "status_bytes": 16,
            "all_reduce_ms": 0.1, "compute_ms": 3.0}  # fmt: skip
    return {
        label: {"cases": {"1": {"median_its": rate, "engine": "vmap",
                                **(comm if label.startswith("2 processes") else {})}}}
        for label, rate in zip(labels, rates)
    }  # fmt: skip


def test_report_gives_medians_of_per_round_ratios() -> None:
    scaling = load_scaling()
    args = scaling.parse_args(["--inner-steps", "1"])
    rounds = [fake_round((100.0, 120.0, 150.0)), fake_round((100.0, 100.0, 170.0)),
              fake_round((50.0, 60.0, 90.0))]  # fmt: skip
    report = scaling.format_report(rounds, args)
    # rates: medians 100, 100, 150; ratios per round 1.5, 1.7, 1.8 -> 1.7 and 1.25, 1.7, 1.5
    assert "| 1 | 100.0 | 100.0 | 150.0 | 1.70x | 1.50x |" in report
    assert "| 1 | 7044 | 7276 | 16 | 0.100 | 3.00 |" in report


def test_parse_args_defaults_and_errors() -> None:
    scaling = load_scaling()
    quick = scaling.parse_args(["--quick"])
    assert (quick.rounds, quick.repeats, quick.steps, quick.inner_steps) == (1, 3, 10, [1, 5])
    with pytest.raises(SystemExit):
        scaling.parse_args(["--meta-batch", "1"])  # fewer tasks than processes
    with pytest.raises(SystemExit):
        scaling.parse_args(["--repeats", "0"])


@pytest.mark.slow
def test_smallest_real_run() -> None:
    """Launches three configurations (torchrun included): about 30 s on 2 cores."""
    scaling = load_scaling()
    result = scaling.main(
        ["--rounds", "1", "--repeats", "1", "--steps", "2", "--warmup", "1",
         "--inner-steps", "1", "--meta-batch", "5"]
    )  # fmt: skip
    (only,) = result["rounds"]
    assert only["2 processes x 1 thread"]["world_size"] == 2
    assert only["1 process x 2 threads"]["threads"] == 2
    assert "## What one meta-step communicates" in result["report"]
