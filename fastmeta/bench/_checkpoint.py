"""Checkpoints: a learner's ``state_dict`` with everything needed to rebuild and resume it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "fastmeta.checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the previous file intact.

    The payload is written to a temporary file in the same directory, flushed to disk and
    renamed over ``path`` (an atomic replace on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain data only).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a fastmeta checkpoint, or from a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; `fastmeta bench` writes them to "
            f"OUT/checkpoints/<algorithm>.pt"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a foreign or corrupt file
        raise ValueError(
            f"{str(path)!r} is not a readable fastmeta checkpoint ({type(error).__name__}: "
            f"{error})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a fastmeta checkpoint (no format={FORMAT!r} entry); "
            f"pass a file from OUT/checkpoints/ of a `fastmeta bench` run"
        )
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint format {payload['format_version']}, newer than this "
            f"fastmeta reads ({FORMAT_VERSION}); upgrade fastmeta"
        )
    return payload
