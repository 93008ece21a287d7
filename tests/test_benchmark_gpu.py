"""benchmarks/gpu.py --quick: the GPU table's script runs end to end (here on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_quick_prints_every_shape_precision_and_row(tmp_path, capsys):
    pytest.importorskip("peft")  # installed by .ci/run for the GPT-2 LoRA row
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu = importlib.util.module_from_spec(spec)
    sys.modules["gpu_benchmark"] = gpu
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.json"
    result = gpu.main(["--quick", "--repeats", "1", "--device", "cpu", "--quiet",
                       "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["table"] == result["table"]
    table = result["table"]
    assert list(table) == ["sine", "omniglot", "miniimagenet", "resnet12", "transformer",
                           "gpt2-lora"]
    for name, by_precision in table.items():
        assert list(by_precision) == ["fp32", "bf16"], name
        for precision, cells in by_precision.items():
            for row in ("reference", "loop"):  # these run every model
                assert math.isfinite(cells[row]["ms"]) and cells[row]["ms"] > 0, (name, row)
                assert cells[row]["peak_mib"] is None  # no per-step counter on a CPU
            assert "ms" in cells["auto"], (name, precision)  # the default runs every model
            if name != "gpt2-lora":
                assert "ms" in cells["vmap"], (name, precision)
    for name in table:
        assert f"| {name} | fp32 |" in printed and f"| {name} | bf16 |" in printed
    assert "| shape | precision | reference | hand-vmap | auto | vmap | loop | higher |" in printed
