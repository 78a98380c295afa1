"""SIGTERM handled like Ctrl-C, so ``timeout`` or a supervisor stopping migctl cleans up as an operator's
interrupt does: whatever handles SIGINT at that moment (asyncio's runner, the migration follower) runs.

Where SIGINT would only raise KeyboardInterrupt, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt)
instead, so a prompt that shrugs off Ctrl-C (the shell) still ends on SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived where Ctrl-C would have raised KeyboardInterrupt."""


def _sigterm(signum: int, frame: FrameType | None) -> None:
    """(main thread, between bytecodes)"""
    handler = signal.getsignal(signal.SIGINT)
    if handler in (signal.default_int_handler, signal.SIG_IGN, signal.SIG_DFL, None):
        raise Terminated
    signal.raise_signal(signal.SIGINT)


@contextmanager
def sigterm_like_ctrl_c() -> Iterator[None]:
    """Install the SIGTERM bridge for the duration (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
