"""Stop cleanly on Ctrl-C (SIGINT) and on SIGTERM, however the process was started.

A process started from a background job of a non-interactive shell (``cmd &`` in a CI script,
``nohup``) inherits SIGINT as *ignored*: Python then never raises ``KeyboardInterrupt`` and a
long ``capdiag overfit`` cannot be interrupted at all. CI systems and job schedulers stop jobs
with SIGTERM, whose default action kills the process without the partial result. The CLI
therefore installs both handlers itself: SIGINT raises ``KeyboardInterrupt`` as usual, SIGTERM
raises ``Terminated`` (a ``KeyboardInterrupt``, so every loop that stops cleanly on Ctrl-C also
stops cleanly on SIGTERM). Only the CLI calls this; the library never touches signal handlers.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: handled like Ctrl-C, reported with exit code 143 (128 + 15)."""


class Signals:
    """What arrived during an ``interruptible()`` block (the last signal's number, or None)."""

    last: Optional[int] = None

    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's 128 + signal number)."""
        return 128 + (self.last or signal.SIGINT)


@contextlib.contextmanager
def interruptible() -> Iterator[Signals]:
    """SIGINT -> KeyboardInterrupt and SIGTERM -> Terminated for the block; handlers restored after."""
    seen = Signals()
    if threading.current_thread() is not threading.main_thread():  # signal.signal only works there
        yield seen
        return

    def on_int(signum, frame):
        seen.last = signum
        raise KeyboardInterrupt()

    def on_term(signum, frame):
        seen.last = signum
        raise Terminated()

    old_int = signal.signal(signal.SIGINT, on_int)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
