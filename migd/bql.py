"""The big lock (QEMU's BQL).

One re-entrant lock serialises everything that changes the machine or the migration's view of it:
QMP command handlers that touch the machine, the dirty-bitmap sync and the completion critical
section of the migration thread, and run-state changes of the incoming thread. It is never held across
I/O on a migration channel and never across an ``await``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class BigLock:
    """A re-entrant lock that knows whether the calling thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, timeout: float = -1) -> bool:
        ok = self._lock.acquire(timeout=timeout)
        if ok:
            self._owner = threading.get_ident()
            self._depth += 1
        return ok

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    def held(self) -> bool:
        """True when the calling thread holds the lock (for assertions in code that requires it)."""
        return self._owner == threading.get_ident()

    def __enter__(self) -> BigLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextmanager
    def unlocked(self) -> Iterator[None]:
        """Drop the lock for a blocking wait (e.g. pre-switchover) and take it back afterwards."""
        depth = self._depth
        for _ in range(depth):
            self.release()
        try:
            yield
        finally:
            for _ in range(depth):
                self.acquire()


BQL = BigLock()
