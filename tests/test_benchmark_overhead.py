"""benchmarks/scale.py --overhead: its rows compute the same meta-gradient (the timing is
the script's business, never a test's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _scale() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scale_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_overhead"] = module
    spec.loader.exec_module(module)
    return module


def _gradients(rows: dict, names: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
    task = _scale().CONFIGS["sine"].batch(25)
    found = {}
    for name in names:
        rows[name](task)
        found[name] = [g.detach().clone() for g in rows[name].grads()]
    return found


@pytest.mark.parametrize("steps", [1, 5])
def test_overhead_rows_eager_compute_the_same_meta_gradient(steps):
    rows = _scale().overhead_rows(steps, "cpu")
    grads = _gradients(rows, ("hand-vmap", "default"))
    for ours, hand in zip(grads["default"], grads["hand-vmap"]):
        torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_overhead_rows_compiled_compute_the_same_meta_gradient():
    rows = _scale().overhead_rows(1, "cpu")
    compiled = ("hand-vmap compiled", "compile=True", "hand-grad compiled")
    grads = _gradients(rows, ("hand-vmap", *compiled))
    for name in compiled:
        for ours, hand in zip(grads[name], grads["hand-vmap"]):
            torch.testing.assert_close(ours, hand, rtol=1e-5, atol=1e-6)
