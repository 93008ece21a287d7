"""benchmarks/foundation.py --quick: every row runs the tiny models exactly, the table prints."""

from __future__ import annotations

import re

import pytest

from tests.test_benchmarks import _load

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_quick_run_prints_every_row_and_they_agree(capsys: pytest.CaptureFixture[str]) -> None:
    foundation = _load("foundation")
    foundation.main(["--quick", "--algorithms", "maml", "--steps", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    for model in foundation.QUICK_MODELS:
        assert f"== {model}:" in out and f"{model}, maml, 1 inner step   default/best" in out
    # higher cannot copy peft's classes: its error is shown, every other row ran exactly
    assert out.count("higher       fails: TypeError") == 1  # on the LoRA model
    assert "fails" not in out.replace("higher       fails: TypeError", "")
    errors = [float(found) for found in re.findall(r" (\d\.\de[+-]\d\d)$", out, re.M)]
    assert len(errors) == 6 + 6 + 5 and max(errors) < 1e-5  # float32 rounding


def test_parse_args_rejects_bad_values() -> None:
    foundation = _load("foundation")
    with pytest.raises(SystemExit):
        foundation.parse_args(["--steps", "0"])
    args = foundation.parse_args(["--quick"])
    assert args.models == list(foundation.QUICK_MODELS) and args.repeats == 5
