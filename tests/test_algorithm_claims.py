"""The algorithms the docs, the README and the package description name come from one
source: ``fastmeta.algorithms.__all__`` (the baselines aside)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fastmeta.algorithms

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"JointTraining"}
# How prose names each algorithm class.
PROSE = {"MAML": "MAML", "FOMAML": "first-order MAML", "Reptile": "Reptile",
         "MetaSGD": "Meta-SGD", "ANIL": "ANIL", "DAML": "DAML", "MAMLPlusPlus": "MAML++",
         "IMAML": "implicit MAML"}
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve")
ALGORITHMS = [name for name in fastmeta.algorithms.__all__ if name not in BASELINES]


def _intro(path: Path) -> str:
    """The first paragraph after the title."""
    return " ".join(path.read_text(encoding="utf-8").split("\n\n")[1].split())


def test_every_algorithm_has_a_prose_name():
    assert set(ALGORITHMS) == set(PROSE), "name the new algorithm in PROSE and in the docs"


@pytest.mark.parametrize("source", ["README.md", "docs/package-description.md", "pyproject"])
def test_the_introductions_name_every_algorithm(source):
    if source == "pyproject":
        found = re.search(r'^description = "(.*)"$', (ROOT / "pyproject.toml").read_text(),
                          re.M)
        assert found, "pyproject.toml has no one-line description"
        text = found.group(1)
    else:
        text = _intro(ROOT / source)
    missing = [PROSE[name] for name in ALGORITHMS
               if not re.search(rf"(?<![\w-]){re.escape(PROSE[name])}(?![\w+])", text)]
    assert not missing, f"{source} does not name {missing}"


def test_docs_index_counts_and_names_every_algorithm():
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert f"One API for {NUMBERS[len(ALGORITHMS) - 1]} algorithms" in text
    assert all(f"`{name}`" in text for name in ALGORITHMS)


def test_no_page_gives_another_number_of_algorithms():
    wrong = [word for i, word in enumerate(NUMBERS) if i != len(ALGORITHMS) - 1]
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    pattern = re.compile(rf"\b({'|'.join(wrong)}) (meta-learning )?algorithms\b", re.I)
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in pages
             for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert not found, found
