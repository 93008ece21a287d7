"""The documentation runs: every ```python block of the README and of docs/ is executed.

The blocks of one file run in order in one namespace, like the cells of a notebook, in a
temporary working directory (what they write goes there). A block that must not run, such
as learn2learn's or higher's side of a migration guide (neither library is installed
here), is preceded by the line ``<!-- not run: REASON -->``; the reason is required and
shown in the test's output when it is missing.

Also checked: the README's relative links lead to files that exist, and the package
description that the package index shows has only absolute links and the README's
quickstart, word for word.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, for blocks marked <!-- not run: ... -->


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with their not-run markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match is None:
            index += 1
            continue
        start, indent = index, match["indent"]
        language = match["info"].strip().split(" ")[0] if match["info"].strip() else ""
        index += 1
        body: list[str] = []
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][len(indent):] if lines[index].startswith(indent) else
                        lines[index])
            index += 1
        if index == len(lines):
            raise AssertionError(f"{path}:{start + 1}: code block never closed")
        index += 1
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = NOT_RUN.match(previous)
        found.append(Block(path, start + 1, language, textwrap.dedent("\n".join(body)),
                           None if marker is None else marker["reason"]))
    return found


def documents() -> list[Path]:
    """README.md and every page of docs/, except the generated benchmark outputs and the
    package description (its one Python block is the README's, checked below)."""
    pages = sorted(
        p for p in DOCS.rglob("*.md")
        if "results" not in p.relative_to(DOCS).parts and p.name != "package-description.md"
    )
    return [ROOT / "README.md", *pages]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _python(path: Path) -> list[Block]:
    return [block for block in blocks(path) if block.language in ("python", "py")]


@pytest.mark.parametrize("path", [p for p in documents() if _python(p)], ids=_id)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    python = _python(path)
    for block in python:
        if block.not_run is not None:
            assert block.not_run, f"{_id(path)}:{block.line}: say why the block is not run"
    runnable = [block for block in python if block.not_run is None]
    assert runnable, f"{_id(path)}: every Python block is marked not run"
    monkeypatch.chdir(tmp_path)
    dtype, threads, rng = torch.get_default_dtype(), torch.get_num_threads(), torch.get_rng_state()
    namespace: dict[str, object] = {"__name__": "__docs__"}
    try:
        for block in runnable:
            where = f"{_id(path)}:{block.line}"
            try:
                exec(compile(block.code, where, "exec"), namespace)  # noqa: S102
            except Exception as error:
                raise AssertionError(f"the code block at {where} failed: {error!r}") from error
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)


def test_not_run_markers_stand_before_a_block() -> None:
    """A not-run marker must stand right before a block, never alone."""
    for path in documents():
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if NOT_RUN.match(line):
                following = next((x for x in lines[number + 1:] if x.strip()), "")
                assert FENCE.match(following), f"{_id(path)}:{number + 1}: marker without block"


def test_readme_links_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "#", "mailto:")):
            continue
        assert (ROOT / target.split("#")[0]).exists(), f"README links to missing {target}"


def test_package_description_is_absolute_and_matches_the_readme() -> None:
    description = DOCS / "package-description.md"
    text = description.read_text(encoding="utf-8")
    for target in LINK.findall(text) + re.findall(r'src="([^"]+)"', text):
        assert target.startswith("https://"), (
            f"{_id(description)} links to {target!r}: the package index cannot follow "
            f"relative links"
        )

    def quickstart(path: Path) -> str:
        return next(b.code for b in blocks(path) if b.language == "python" and b.not_run is None)

    assert quickstart(description) == quickstart(ROOT / "README.md")
