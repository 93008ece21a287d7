"""Output directories of ``fastmeta bench``: checked before training, locked while in use.

A run into ``--out`` first makes sure the directory can be created and written (so a bad
path fails in a second, not after hours of training), then takes ``OUT/.fastmeta.lock``:
a second run into the same directory is refused with the holder's pid, host and start
time. A lock left by a process that died on this host is detected and taken over.
Temporary files of writes that a killed run left behind are removed.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

LOCK_NAME = ".fastmeta.lock"


class OutDirError(ValueError):
    """``--out`` cannot hold a run: it is a file, or cannot be created or written."""


class RunLocked(RuntimeError):
    """Another live run holds the output directory's lock."""


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else type(error).__name__


def check_out(out: Path, outputs: Iterable[str] = ()) -> Path:
    """Create ``out`` and ``out/checkpoints`` and check that files can be written there.

    Args:
        out: the output directory.
        outputs: names (relative to ``out``) the run will write; none may be a directory.

    Returns:
        ``out/checkpoints``.

    Raises:
        OutDirError: naming the path, what is wrong and the fix.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(
            f"--out {str(out)!r} is a file, not a directory; choose another --out (a new or "
            f"existing directory)"
        )
    checkpoints = out / "checkpoints"
    for directory in (out, checkpoints):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocking = next((p for p in directory.parents if p.exists() and not p.is_dir()),
                            directory)
            raise OutDirError(
                f"--out {str(out)!r} cannot be created: {str(blocking)!r} is a file, not a "
                f"directory; choose another --out"
            ) from None
        except OSError as error:
            raise OutDirError(
                f"--out {str(out)!r} cannot be created ({_reason(error)}: "
                f"{str(error.filename or directory)!r}); choose a directory you can write, or "
                f"fix its permissions"
            ) from None
        try:
            handle, probe = tempfile.mkstemp(prefix=".fastmeta-probe.", dir=directory)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise OutDirError(
                f"--out {str(out)!r}: cannot write in {str(directory)!r} ({_reason(error)}); "
                f"choose a directory you can write, or fix its permissions"
            ) from None
    for name in outputs:
        if (out / name).is_dir():
            raise OutDirError(
                f"--out {str(out)!r}: {str(out / name)!r} is a directory, but the run writes a "
                f"file there; move it away or choose another --out"
            )
    return checkpoints


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask (``0o644`` usually)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed over it).

    The file gets the mode of any newly created file (as the figures do), not the
    owner-only ``0o600`` of the temporary file.
    """
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the ``*.tmp`` files that atomic writes of a killed run left in ``out``.

    Only files named like fastmeta's own temporaries (``<name>.<random>.tmp`` beside a
    file the run writes) are removed; call it while holding the lock.
    """
    removed = []
    for directory in (out, out / "checkpoints"):
        for path in sorted(directory.glob("*.*.tmp")):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(holder: dict[str, Any]) -> str:
    if "pid" not in holder:
        return "a run whose lock file is empty or unreadable (it may be starting)"
    return (
        f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
        f"{holder.get('started')} ({holder.get('command', '?')})"
    )


class RunLock:
    """``OUT/.fastmeta.lock``: one run at a time per output directory.

    The lock file holds the pid, host, start time and command line of its holder. It is
    created atomically (``O_CREAT | O_EXCL``); a lock whose holder was on this host and is
    no longer running is stale and taken over. Use as a context manager.

    Args:
        out: the output directory (must exist).

    Attributes:
        took_over: the stale holder replaced, or ``None``.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_NAME
        self.took_over: dict[str, Any] | None = None
        self._held = False

    def _holder(self) -> dict[str, Any]:
        try:
            value = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _create(self) -> bool:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as file:
            json.dump(record, file)
        return True

    def acquire(self) -> RunLock:
        """Take the lock.

        Raises:
            RunLocked: a live process (or one on another host) holds it.
        """
        if self._create():
            self._held = True
            return self
        holder = self._holder()
        pid = holder.get("pid")
        local = holder.get("host") == socket.gethostname()
        if local and isinstance(pid, int) and not _alive(pid):
            self.path.unlink(missing_ok=True)  # stale: its holder is gone
            if self._create():
                self._held, self.took_over = True, holder
                return self
            holder = self._holder()  # another run took it over first
        where = "this host" if holder.get("host") == socket.gethostname() else "another host"
        raise RunLocked(
            f"--out {str(self.path.parent)!r} is in use by another fastmeta run: "
            f"{_describe(holder)}, on {where}. Wait for it to finish, or choose another --out; "
            f"if you are sure that run is gone, delete {str(self.path)!r}"
        )

    def release(self) -> None:
        """Give the lock up (only if this process holds it)."""
        if self._held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

