"""Checkpoints: a learner's ``state_dict`` with everything needed to rebuild and resume it."""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ._digests import digests, mismatches

FORMAT = "fastmeta.checkpoint"
FORMAT_VERSION = 2  # 2: a "digests" entry (SHA-256 per tensor and of the spec)

# Entries every learner checkpoint holds, with what each is for (named in errors).
REQUIRED = {
    "spec": "how to rebuild the learner",
    "state_dict": "the learner's weights",
    "iteration": "how far it trained",
}

NOT_A_CHECKPOINT = (
    "{path!r} is not a fastmeta checkpoint: {why}. Pass a file from OUT/checkpoints/ of a "
    "`fastmeta bench` run"
)
UNSAFE = (
    ". fastmeta reads checkpoints with torch.load(weights_only=True), which loads tensors "
    "and plain data only: this file holds more, and unpickling it could run code, so load "
    "it only if you trust where it came from"
)


DAMAGED = (
    "{path!r} is damaged: {what} no longer match{es} the SHA-256 digest{s} written with "
    "{them}, so the file changed on disk or in a copy after fastmeta wrote it (its weights "
    "would be garbage). Copy it again from where it came from, or delete it and retrain "
    "(`fastmeta bench ... --resume` starts that run afresh)"
)
UNVERIFIED = (
    "{path!r} has no digests (written by fastmeta before checkpoint format 2), so damage "
    "to its bytes cannot be detected; it is loaded unchecked. Save it again with "
    "fastmeta.bench.save_checkpoint to add them"
)


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: foreign, corrupt, inconsistent or mismatched."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint from an older fastmeta has no digests: damage would go unnoticed."""


def temporary_prefix(path: Path) -> str:
    """Prefix of the temporary files that :func:`save_checkpoint` writes beside ``path``."""
    return path.name + "."


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically: a crash leaves the previous file intact.

    The payload is written to a temporary file in the same directory, flushed to disk and
    renamed over ``path`` (an atomic replace on POSIX and Windows). A process killed
    mid-write leaves ``<name>.<random>.tmp``, which the next run into the same output
    directory removes. The file carries a SHA-256 digest of every tensor and of
    ``payload["spec"]`` (a ``"digests"`` entry, replacing any in ``payload``), which
    :func:`load_checkpoint` verifies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "format": FORMAT, "format_version": FORMAT_VERSION}
    payload["digests"] = digests(payload)
    handle, temporary = tempfile.mkstemp(
        prefix=temporary_prefix(path), suffix=".tmp", dir=path.parent
    )
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

    Every tensor and the spec are checked against the SHA-256 digests written with them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a fastmeta checkpoint (foreign, corrupt,
            truncated, or holding objects other than tensors and plain data), is from
            a newer format, or its bytes changed since it was written (a digest differs).
            The message never advises ``weights_only=False``.

    Warns:
        UnverifiedCheckpointWarning: the checkpoint is from an older fastmeta and has no
            digests to check.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.pt")) or sorted((path / "checkpoints").glob("*.pt"))
        files = ", ".join(str(p) for p in found) or "none found there"
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory; pass one of its checkpoint files "
            f"({files})"
        )
    if path.exists() and not path.is_file():
        raise CheckpointError(NOT_A_CHECKPOINT.format(
            path=str(path), why="it is not a regular file (a device, pipe or socket)"
        ))
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; `fastmeta bench` writes them to "
            f"OUT/checkpoints/<algorithm>.pt"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        with path.open("rb") as file:
            zipped = file.read(4) == b"PK\x03\x04"  # torch.save's zip container
        if zipped:
            raise CheckpointError(NOT_A_CHECKPOINT.format(
                path=str(path), why="it holds Python objects other than tensors and plain data"
            ) + UNSAFE) from None
        raise CheckpointError(NOT_A_CHECKPOINT.format(
            path=str(path), why="it is not a file that torch.save wrote"
        )) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(NOT_A_CHECKPOINT.format(
            path=str(path), why=f"it is truncated, corrupt or another format ({reason})"
        )) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(NOT_A_CHECKPOINT.format(
            path=str(path), why=f"it has no format={FORMAT!r} entry"
        ))
    version = payload.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint format {version!r}, newer than this fastmeta reads "
            f"({FORMAT_VERSION}); upgrade fastmeta"
        )
    verify(path, payload)
    return payload


def verify(path: Path | str, payload: dict[str, Any]) -> None:
    """Compare ``payload`` with its digests; warn when it has none (an older checkpoint).

    Raises:
        CheckpointError: a tensor or the spec differs from its digest, naming the file,
            what differs and what to do.
    """
    if "digests" not in payload:
        warnings.warn(UNVERIFIED.format(path=str(path)), UnverifiedCheckpointWarning,
                      stacklevel=3)
        return
    found = mismatches(payload)
    if found:
        what = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        many = len(found) > 1
        raise CheckpointError(DAMAGED.format(
            path=str(path), what=what, es="" if many else "es", s="s" if many else "",
            them="them" if many else "it",
        ))


def check_learner_payload(path: Path | str, payload: dict[str, Any]) -> None:
    """Check that a learner checkpoint holds what rebuilding and resuming it needs.

    Raises:
        CheckpointError: an entry is missing or malformed, or the spec names another
            algorithm than the checkpoint (a relabelled file).
    """
    for key, purpose in REQUIRED.items():
        if key not in payload:
            raise CheckpointError(
                f"{str(path)!r} lacks its {key!r} entry ({purpose}); the file is damaged or "
                f"was edited. Retrain it: delete it and run `fastmeta bench ... --resume`"
            )
    spec = payload["spec"]
    missing = [k for k in ("benchmark", "algorithm", "model", "learner")
               if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise CheckpointError(
            f"{str(path)!r}: its spec lacks {', '.join(missing)}; the file is damaged or was "
            f"edited. Retrain it: delete it and run `fastmeta bench ... --resume`"
        )
    algorithm = payload.get("algorithm", spec["algorithm"])  # format 1 wrote the run's name
    run = payload.get("run", algorithm)
    if algorithm != spec["algorithm"] and not str(run).startswith(f"{spec['algorithm']}-"):
        raise CheckpointError(
            f"{str(path)!r} is labelled {algorithm!r} but its spec builds "
            f"{spec['algorithm']!r}; the file was edited or renamed. Retrain it: delete it "
            f"and run `fastmeta bench ... --resume`"
        )
