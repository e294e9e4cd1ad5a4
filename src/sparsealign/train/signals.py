"""SIGTERM (what Slurm and Kubernetes send before killing a job) and SIGINT end a run as Ctrl-C does.

While :class:`StopOnSignal` is active, the first SIGTERM or SIGINT raises :class:`KeyboardInterrupt` in the
main thread, so the training loop saves a checkpoint and returns; a second one, while that checkpoint is
being written, restores the default handler and re-sends the signal: the process ends at once. The previous
handlers come back on exit. Outside the main thread (where Python allows no handlers) it does nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """A context manager; ``received`` is the name of the first signal caught (``"SIGTERM"``), else None."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second signal: no more saving, end now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signal.Signals(signum).name
        raise KeyboardInterrupt(self.received)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler installed outside Python, which cannot be restored
                signal.signal(signum, previous)
        self._previous.clear()
