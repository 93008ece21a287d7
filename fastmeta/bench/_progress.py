"""A dependency-free progress line: count, rate, ETA and the running loss.

Why not tqdm or rich: the line needs the running meta-loss beside the count, and in a log
file or CI (no terminal) one short line per tenth of the work instead of the
carriage-return redraws that tqdm writes there; that is 90 lines here, against one more
dependency for every ``fastmeta bench`` run. ``--log tensorboard`` gives the full curves.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Progress of one long loop, redrawn in place on a terminal.

    On a terminal the line is redrawn at most ten times a second. Elsewhere (a log file,
    CI) nothing is drawn in place: one line is printed at each tenth of the work, so logs
    stay short. ``enabled=False`` prints nothing at all.

    Args:
        total: number of units of work (e.g. meta-iterations).
        description: what is running, printed at the start of the line.
        start: units already done (a resumed run).
        stream: where to write (default ``sys.stderr``).
        enabled: ``False`` to stay silent.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        start: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
    ) -> None:
        self.total = max(int(total), 1)
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._start_count = int(start)
        self._count = int(start)
        self._started = time.perf_counter()
        self._last_draw = 0.0
        self._next_milestone = (self._count * 10 // self.total + 1) * self.total / 10
        self._loss: float | None = None

    def update(self, count: int, loss: float | None = None) -> None:
        """Record that ``count`` units are done; ``loss`` is the latest running loss."""
        self._count = int(count)
        if loss is not None:
            self._loss = float(loss)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.interactive:
            if now - self._last_draw >= 0.1 or self._count >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
        elif self._count >= self._next_milestone:
            while self._next_milestone <= self._count:
                self._next_milestone += self.total / 10
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """The current progress line (without a newline)."""
        done = self._count - self._start_count
        elapsed = time.perf_counter() - self._started
        percent = 100 * self._count / self.total
        parts = [f"{self.description}: {self._count}/{self.total} ({percent:3.0f}%)"]
        if done > 0:
            rate = elapsed / done
            parts.append(f"{1000 * rate:.1f} ms/it")
            parts.append(f"ETA {_clock(rate * (self.total - self._count))}")
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4g}")
        return "  ".join(parts)

    def close(self, message: str | None = None) -> None:
        """End the progress line, optionally with a final message."""
        if not self.enabled:
            return
        if self.interactive:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
