"""Command-line mistakes: one clear line, not a usage dump with the option named twice."""

from __future__ import annotations

import pytest

from fastmeta.cli import main


def test_a_misspelt_algorithm_is_named_once_with_a_suggestion(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "sine", "--algorithms", "mamll", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("--algorithms") == 1
    assert "unknown algorithm(s) ['mamll'] ('mamll': did you mean 'maml'?)" in err
    assert "usage:" not in err and "--help` lists every option" in err
    assert len(err.splitlines()) == 2


def test_a_short_usage_is_still_shown(capsys):
    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert err.startswith("usage: fastmeta") and "required: command" in err
