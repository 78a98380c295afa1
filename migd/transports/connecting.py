"""Socket connects that another thread can abandon, and that give up by a deadline.

A blocking ``connect(2)`` to an address that never answers (a SYN black hole, a full backlog) holds
its thread for the kernel's two minutes of SYN retries, and closing the socket from another thread
does not wake it. Each migration connect runs on a worker thread, so a few cancelled migrations used to
starve every other command that needs one. Here the socket is non-blocking and the thread waits in
``poll(2)`` on the socket *and* on a :class:`ConnectCancel`'s eventfd: ``migrate_cancel`` frees the
thread at once, and a deadline bounds the wait when nobody cancels.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time

CONNECT_TIMEOUT = 60.0  # seconds; the kernel's own SYN retries give up after about 130 s
_UNIX_RETRY = (0.005, 0.1)  # a unix listener's full backlog (EAGAIN) is retried with this back-off


class ConnectCancelled(OSError):
    """The connect was abandoned through its :class:`ConnectCancel`."""

    def __init__(self) -> None:
        super().__init__(errno.ECANCELED, "Connection cancelled")


class ConnectCancel:
    """A handle that makes an in-flight :func:`connect_socket` return at once.

    ``cancel()`` may be called from any thread, before, during or after the connect. ``close()`` (by
    the owner) releases the eventfd, but only once no connect is polling it: the owner may stop
    waiting for a connect (its task cancelled) while the thread still runs. The lock keeps a late
    ``cancel`` from writing to a descriptor number that was closed and reused.
    """

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._users = 0
        self._closing = False
        self.cancelled = False

    def cancel(self) -> None:
        """Wake the connecting thread (any thread)."""
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            if self._fd >= 0:
                os.eventfd_write(self._fd, 1)

    def close(self) -> None:
        """Release the eventfd now, or when the last connect using it returns (any thread)."""
        with self._lock:
            self._closing = True
            if self._users:
                return
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def acquire(self) -> int:
        """The eventfd for one connect's poll (-1 once closed); pair with ``release()``."""
        with self._lock:
            if self._fd >= 0:
                self._users += 1
            return self._fd

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or not self._closing:
                return
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def _wait(fd: int | None, cancel: ConnectCancel | None, wake: int, deadline: float,
          until: float | None = None) -> bool:
    """Poll ``fd`` (if any) for writability until ``deadline`` (then ETIMEDOUT) or ``until`` (then False).

    ``wake`` is ``cancel``'s eventfd (or -1): it becomes readable when the connect is cancelled.
    """
    poller = select.poll()
    if fd is not None:
        poller.register(fd, select.POLLOUT)
    if wake >= 0:
        poller.register(wake, select.POLLIN)
    while True:
        if cancel is not None and cancel.cancelled:
            raise ConnectCancelled()
        now = time.monotonic()
        if now >= deadline:
            raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
        if until is not None and now >= until:
            return False
        limit = deadline if until is None else min(deadline, until)
        try:
            ready = poller.poll(int((limit - now) * 1000) + 1)
        except InterruptedError:
            continue
        if fd is not None and any(rfd == fd for rfd, _ in ready):
            return True


def connect_socket(
    sock: socket.socket,
    address: object,
    cancel: ConnectCancel | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> None:
    """Connect ``sock`` to ``address`` (calling thread), cancellable and bounded by ``timeout``.

    Raises ``OSError`` with the kernel's errno (``ETIMEDOUT`` at the deadline), or
    :class:`ConnectCancelled`. The socket is left blocking once connected.
    """
    deadline = time.monotonic() + timeout
    wake = cancel.acquire() if cancel is not None else -1
    try:
        _connect(sock, address, cancel, wake, deadline)
    finally:
        if cancel is not None:
            cancel.release()
    sock.setblocking(True)


def _connect(sock: socket.socket, address: object, cancel: ConnectCancel | None, wake: int,
             deadline: float) -> None:
    sock.setblocking(False)
    delay = _UNIX_RETRY[0]
    while True:
        if cancel is not None and cancel.cancelled:
            raise ConnectCancelled()
        err = sock.connect_ex(address)  # type: ignore[arg-type]
        if err in (0, errno.EISCONN):
            return
        if err == errno.EAGAIN and sock.family == socket.AF_UNIX:
            # the listener's backlog is full: no completion to wait for, so try again a little later
            _wait(None, cancel, wake, deadline, time.monotonic() + delay)
            delay = min(delay * 2, _UNIX_RETRY[1])
            continue
        if err not in (errno.EINPROGRESS, errno.EALREADY, errno.EINTR):
            raise OSError(err, os.strerror(err))
        _wait(sock.fileno(), cancel, wake, deadline)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return
