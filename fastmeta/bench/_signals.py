"""SIGINT and SIGTERM: stop meta-training after the current meta-iteration, checkpointed.

Schedulers, ``docker stop`` and preemption send SIGTERM; Ctrl-C sends SIGINT. During
training the first of either asks the loop to stop after the meta-iteration in progress
and to write a checkpoint; a second one aborts at once (the last checkpoint is kept, as
every checkpoint write is atomic). During evaluation a signal stops at once: nothing is
lost, as every learner is already checkpointed.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(RuntimeError):
    """The run stopped on a signal (or ``stop_after``); its checkpoints are kept.

    Attributes:
        signum: the signal that stopped it, or ``None``.
    """

    def __init__(self, message: str, *, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The conventional exit status, ``128 + signum`` (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a stop request"


class StopFlag:
    """Set by SIGINT/SIGTERM (see :func:`stop_on_signals`); checked between meta-iterations.

    Attributes:
        requested: a stop was asked for.
        signum: the signal that asked, or ``None``.
        evaluating: while true, a signal raises :class:`Interrupted` at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self.evaluating = False

    def request(self, signum: int | None = None) -> None:
        """Ask the run to stop (what the signal handler does)."""
        if self.evaluating:
            raise Interrupted(f"stopped during evaluation by {signal_name(signum)}",
                              signum=signum)
        if self.requested:  # the second signal: do not wait for the meta-iteration
            raise Interrupted(
                f"stopped at once by a second {signal_name(signum)}; the last checkpoint is "
                f"kept", signum=signum,
            )
        self.requested, self.signum = True, signum

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Within this block a signal stops the run at once."""
        self.evaluating = True
        try:
            if self.requested:
                raise Interrupted(f"stopped before evaluation by {signal_name(self.signum)}",
                                  signum=self.signum)
            yield
        finally:
            self.evaluating = False


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to ``flag.request`` while the block runs.

    Outside the main thread signals cannot be handled and are left alone.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        flag.request(signum)

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        for signum, old in previous.items():
            signal.signal(signum, old)
        yield flag
        return
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)

