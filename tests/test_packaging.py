"""The package as a user gets it: build the wheel and the sdist, install the wheel into a
fresh virtual environment that has nothing but torch, run the command line there, and run
tests from the unpacked sdist.

The fresh environment does not see this one's packages (no ``--system-site-packages``).
torch is installed into it at the version running here, which pip resolves from its
configured sources (a local wheel on machines that have one, so the test needs no
download of torch); fastmeta's other dependencies come from the package index.
Building uses ``python -m build`` with build isolation. Slow (about a minute or two): it
copies torch into the new environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path | None = None, timeout: float = 900) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=environment, capture_output=True,
        text=True, timeout=timeout,
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({done.returncode}):\n{done.stdout[-4000:]}\n"
        f"{done.stderr[-4000:]}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", out, ROOT)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def _metadata(wheel: Path) -> tuple[list[str], dict[str, list[str]], str]:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        text = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    message = Parser().parsestr(text.decode())
    headers: dict[str, list[str]] = {}
    for key, value in message.items():
        headers.setdefault(key, []).append(value)
    return names, headers, str(message.get_payload())


def test_wheel_metadata(dist: dict[str, Path]) -> None:
    names, headers, description = _metadata(dist["wheel"])
    assert headers["License-Expression"] == ["MIT"]
    assert any(name.endswith("licenses/LICENSE") for name in names), names
    assert "fastmeta/py.typed" in names
    assert not any(name.startswith(("tests/", "docs/", "examples/")) for name in names)
    classifiers = headers["Classifier"]
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert headers["Description-Content-Type"] == ["text/markdown"]
    assert any(r.startswith("torch>=2.1") for r in headers["Requires-Dist"])
    for target in re.findall(r"\]\(([^)\s]+)\)", description):
        assert target.startswith("https://"), f"relative link {target!r} in the description"


def test_sdist_has_what_its_tests_need(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = _run("git", "-C", ROOT, "ls-files", "tests", "docs", "examples", "benchmarks")
    for path in tracked.split():
        assert path in names, f"{path} is tracked but missing from the sdist"
    for path in ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "mkdocs.yml"):
        assert path in names


def test_fresh_environment(dist: dict[str, Path], tmp_path: Path) -> None:
    env = tmp_path / "env"
    _run(sys.executable, "-m", "venv", env)
    python = env / "bin" / "python"
    pip = (python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    _run(*pip, f"torch=={torch.__version__}")
    _run(*pip, dist["wheel"])

    expected = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert expected is not None
    version = _run(env / "bin" / "fastmeta", "--version").strip()
    assert version == f"fastmeta {expected[1]}", version
    listed = _run(python, "-c", "import fastmeta; print(dir(fastmeta))")
    assert "annotations" not in listed and "PackageNotFoundError" not in listed, listed

    run = tmp_path / "run"
    _run(env / "bin" / "fastmeta", "bench", "sine", "--quick", "--iterations", "20",
         "--eval-tasks", "10", "--algorithms", "maml,fomaml", "--no-plots", "--quiet",
         "--out", run)
    assert (run / "results.json").is_file() and (run / "results.md").is_file()

    # The sdist's own tests run from the unpacked sdist (its conftest.py included).
    with tarfile.open(dist["sdist"]) as archive:
        archive.extractall(tmp_path / "sdist", filter="data")
    source = next((tmp_path / "sdist").iterdir())
    _run(*pip, "pytest")
    _run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_errors.py",
         "tests/test_docs.py::test_readme_links_exist", cwd=source)
