"""Smoke test of benchmarks/throughput.py: its smallest run (about 3 s) gives the checked table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def load_throughput() -> ModuleType:
    """Import the benchmark script as a module (it is a script, not part of the package)."""
    return _load("throughput")


def test_throughput_smallest_run(capsys: pytest.CaptureFixture[str]) -> None:
    throughput = load_throughput()
    result = throughput.main(
        ["--repeats", "1", "--warmup", "0", "--no-compile", "--no-memory", "--threads", "1"]
    )
    printed = capsys.readouterr().out

    always = ("higher-loop", "torchfunc-vmap", "fastmeta-auto", "fastmeta-higher")
    assert set(result["throughput"]) == {throughput.case_key(c) for c in throughput.CASES}
    for case in result["throughput"].values():
        rows, unavailable = case["rows"], case["unavailable"]
        assert set(always) <= set(rows)
        # The vmap engine is timed where the library has it, and says why where it has not.
        assert ("fastmeta-vmap" in rows) != ("fastmeta-vmap" in unavailable)
        assert "fastmeta-vmap-compile" not in rows  # --no-compile
        for key, row in rows.items():
            assert row["grad_ok"], f"{key}: meta-gradient off by {row['grad_rel_error']:.1e}"
            assert row["median_ms"] > 0 and len(row["samples_ms"]) == 1
        assert rows["higher-loop"]["vs_higher_loop"] == pytest.approx(1.0)

    for label in throughput.LABELS.values():
        assert f"| {label} |" in printed
    for case in throughput.CASES:
        assert throughput.case_name(case) in printed
    assert "All meta-gradients agree." in printed
    assert "## Targets" in printed
    statuses = {t["name"]: t["status"] for t in result["targets"]}
    assert len(statuses) == 5 and set(statuses.values()) <= {"PASS", "MISS", "SKIP"}
    assert statuses["compile=True >= 25x the higher loop"] == "SKIP"
    assert result["memory"] is None


def test_parse_args_rejects_bad_values() -> None:
    throughput = load_throughput()
    with pytest.raises(SystemExit):
        throughput.parse_args(["--repeats", "0"])
    quick = throughput.parse_args(["--quick"])
    assert (quick.repeats, quick.warmup) == (7, 1)


def _load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module."""
    path = SCRIPT.with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"fastmeta_benchmark_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", ["sine", "transformer"])
@pytest.mark.parametrize("second_order", [True, False])
def test_scale_rows_compute_the_same_meta_gradient(config: str, second_order: bool) -> None:
    """benchmarks/scale.py: the references written there and fastmeta's engines agree."""
    import torch

    scale = _load("scale")
    task = scale.CONFIGS[config].batch(2)
    grads = {}
    for impl in scale.IMPLS:
        step = scale.build(impl, scale.CONFIGS[config], "cpu", second_order)
        step(task)
        grads[impl] = torch.cat([g.flatten() for g in step.grads()])
    reference = grads["reference"]
    for impl, found in grads.items():
        error = float((found - reference).abs().max() / reference.abs().max())
        assert error < 1e-4, (impl, error)
    if second_order:  # the first-order rows really drop the second-order terms
        first = scale.build("reference", scale.CONFIGS[config], "cpu", False)
        first(task)
        dropped = torch.cat([g.flatten() for g in first.grads()])
        assert float((dropped - reference).abs().max()) > 1e-6
