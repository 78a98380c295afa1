"""Listeners that run out of descriptors wait and retry instead of spinning.

When ``accept(2)`` fails for lack of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) the connection stays
in the backlog and the listening socket stays readable, so a loop that simply tries again burns a core
and writes a log line per try (issue 11: 10 CPU-s and 400,000 lines in 10 s). Every listener of migd
instead pauses with a growing delay (:class:`Backoff`), and says so at most once a second
(:class:`LogLimiter`); it serves again within a second of descriptors being free.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable

RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# errors about one connection that went away before we took it: just take the next
TRANSIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


class Backoff:
    """Delays that double from ``first`` to ``limit`` seconds; ``reset()`` after a success."""

    def __init__(self, first: float = 0.01, limit: float = 1.0) -> None:
        self.first = first
        self.limit = limit
        self._next = first

    def next(self) -> float:
        """The delay to wait now (any thread, one user at a time)."""
        delay = self._next
        self._next = min(self._next * 2, self.limit)
        return delay

    def reset(self) -> None:
        self._next = self.first


class LogLimiter:
    """Logs a warning at most once per ``interval`` seconds, counting the ones it held back."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless one was logged less than ``interval`` ago; whether it was logged."""
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, self._suppressed)
        self._last = now
        self._suppressed = 0
        self._log.warning(msg, *args)
        return True
