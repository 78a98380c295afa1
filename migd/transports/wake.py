"""One way to stop a thread blocked on a descriptor: a flag and a self-pipe, polled next to the descriptor.

Linux does not wake a thread blocked in accept(2) when another thread closes the socket, and a pipe has
no shutdown(2). So every wait that another thread may have to end (a listener's accept, an fd or exec
listener waiting for the first byte, an FdChannel's read or write) polls its descriptor together with
the read end of a private pipe, and ``wake()`` writes to that pipe. This module imports nothing from
migd, so every transport module can use it.
"""

from __future__ import annotations

import os
import select
import threading
import time


class Waker:
    """A one-shot wake-up: after ``wake()`` every current and later ``wait()`` returns False at once."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._released = False
        self.woken = False

    def wait(self, fd: int | None, events: int = select.POLLIN, timeout: float | None = None) -> bool | None:
        """Block until ``fd`` reports one of ``events`` (or an error/hang-up): True; until woken: False;
        or, with a ``timeout`` in seconds, until it passed: None. ``fd`` None waits for the wake alone.

        (the waiting thread: migration, incoming, a transport's accept or connect)
        """
        poller = select.poll()
        if fd is not None:
            poller.register(fd, events)
        poller.register(self._r, select.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.woken:
            if deadline is None:
                wait_ms = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait_ms = int(left * 1000) + 1
            try:
                ready = poller.poll(wait_ms)
            except InterruptedError:
                continue
            if self.woken or any(ready_fd == self._r for ready_fd, _ in ready):
                return False
            if ready:
                return True
        return False

    def wake(self) -> bool:
        """End every wait, now and later; True for the one call that did it. (any thread)"""
        with self._lock:
            if self.woken:
                return False
            self.woken = True
            if not self._released:
                try:
                    os.write(self._w, b"x")
                except OSError:
                    pass  # the pipe is full (impossible after one byte) or gone: the flag still holds
            return True

    def release(self) -> None:
        """Close the pipe now and count as woken; only once no thread can still be waiting. (any thread)

        Without it the pipe is closed when the Waker is collected, which is what a listener wants: a
        concurrent accept may still be polling the pipe when ``close()`` returns.
        """
        with self._lock:
            if self._released:
                return
            self._released = True
            self.woken = True
            os.close(self._r)
            os.close(self._w)

    def __del__(self) -> None:
        if not getattr(self, "_released", True):  # True too when pipe2 failed in __init__
            for fd in (self._r, self._w):
                try:
                    os.close(fd)
                except OSError:
                    pass
