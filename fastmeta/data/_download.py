"""Fetching and checking dataset archives: one download helper with MD5 checks and clear errors.

Nothing here runs on import. ``urlopen`` is looked up at call time, so tests replace it.

Why by hand and not with a download library such as pooch (SHA-256, retries, resumable
downloads): this module belongs to ``fastmeta.data``, part of the core library, whose only
dependencies stay torch, higher and numpy. The checksums that torchvision and torchmeta
publish for these archives are MD5 sums; a SHA-256 of ours would only restate a file we
had already trusted, so checking the published MD5 is the stronger test of "this is the
archive they describe". Each archive is fetched once per machine, into a ``.part`` file
that is renamed only once its checksum matches, so a failed download never looks
complete; when it fails, the error says where to put a copy fetched by hand (curl and
wget resume and retry).
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

urlopen: Any = urllib.request.urlopen

_CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    """Hex MD5 digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manual(dataset: str, url: str, path: Path) -> str:
    return (
        f"download {url} by hand (a browser, curl or wget) and put the file at {path}, "
        f"then construct {dataset}(..., download=False)"
    )


def check_md5(path: Path, md5: str | None, *, dataset: str, url: str) -> None:
    """Raise ``ValueError`` if ``path`` does not have the published MD5 ``md5``.

    ``md5=None`` means no checksum is published for this file: nothing is checked.
    """
    if md5 is None:
        return
    actual = md5_of(path)
    if actual != md5:
        raise ValueError(
            f"{dataset}: {path} has MD5 {actual}, but the archive published at {url} has "
            f"MD5 {md5}; the file is incomplete or a different archive. Delete it and pass "
            f"download=True, or {_manual(dataset, url, path)}"
        )


def fetch_archive(path: Path, url: str, md5: str | None, *, download: bool, dataset: str) -> Path:
    """Return ``path``, downloading it from ``url`` first if it is missing and ``download``.

    A download goes to ``path`` + ``.part`` and is renamed only after its MD5 matches,
    so an interrupted download never looks complete. An existing file is checked too.

    Raises:
        FileNotFoundError: If the file is missing and ``download`` is false.
        ConnectionError: If the download fails (offline, URL gone); the message says
            where to put a file fetched by hand.
        ValueError: If the file's MD5 is not the published one.
    """
    if path.is_file():
        check_md5(path, md5, dataset=dataset, url=url)
        return path
    if not download:
        raise FileNotFoundError(
            f"{dataset}: {path} not found. Pass download=True to fetch it from {url}, or "
            f"{_manual(dataset, url, path)}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urlopen(url, timeout=60) as response, open(partial, "wb") as stream:
            shutil.copyfileobj(response, stream, _CHUNK)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise ConnectionError(
            f"{dataset}: could not download {url} ({type(error).__name__}: {error}); "
            f"{_manual(dataset, url, path)}"
        ) from error
    try:
        check_md5(partial, md5, dataset=dataset, url=url)
    except ValueError:
        partial.unlink()
        raise
    partial.replace(path)
    return path
