"""Socket connects that another thread can abandon, and that give up by a deadline.

A blocking ``connect(2)`` to an address that never answers (a SYN black hole, a full backlog) holds
its thread for the kernel's two minutes of SYN retries, and closing the socket from another thread
does not wake it. Each migration connect runs on a worker thread, so a few cancelled migrations used to
starve every other command that needs one. Here the socket is non-blocking and the thread waits in
``poll(2)`` on the socket *and* on a :class:`ConnectCancel`'s wake-up: ``migrate_cancel`` frees the
thread at once, and a deadline bounds the wait when nobody cancels.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from migd.transports.wake import Waker

CONNECT_TIMEOUT = 60.0  # seconds; the kernel's own SYN retries give up after about 130 s
_UNIX_RETRY = (0.005, 0.1)  # a unix listener's full backlog (EAGAIN) is retried with this back-off


class ConnectCancelled(OSError):
    """The connect was abandoned through its :class:`ConnectCancel`."""

    def __init__(self) -> None:
        super().__init__(errno.ECANCELED, "Connection cancelled")


class ConnectCancel:
    """A handle that makes an in-flight :func:`connect_socket` return at once.

    ``cancel()`` may be called from any thread, before, during or after the connect. It is a
    :class:`~migd.transports.wake.Waker` (migd's one wake-up): its pipe is closed when the last holder
    drops it, so a connect thread that outlives its owner's interest still polls a valid descriptor.
    """

    def __init__(self) -> None:
        self.waker = Waker()

    def cancel(self) -> None:
        """Wake the connecting thread (any thread)."""
        self.waker.wake()

    @property
    def cancelled(self) -> bool:
        return self.waker.woken


def _wait(fd: int | None, cancel: ConnectCancel | None, deadline: float, until: float | None = None) -> bool:
    """Wait for ``fd`` (if any) to be writable until ``deadline`` (then ETIMEDOUT) or ``until`` (then
    False); a cancel raises ConnectCancelled."""
    while True:
        if cancel is not None and cancel.cancelled:
            raise ConnectCancelled()
        now = time.monotonic()
        if now >= deadline:
            raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
        if until is not None and now >= until:
            return False
        limit = deadline if until is None else min(deadline, until)
        waker = cancel.waker if cancel is not None else Waker()
        if waker.wait(fd, select.POLLOUT, timeout=limit - now):
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
    _connect(sock, address, cancel, time.monotonic() + timeout)
    sock.setblocking(True)


def _connect(sock: socket.socket, address: object, cancel: ConnectCancel | None, deadline: float) -> None:
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
            _wait(None, cancel, deadline, time.monotonic() + delay)
            delay = min(delay * 2, _UNIX_RETRY[1])
            continue
        if err not in (errno.EINPROGRESS, errno.EALREADY, errno.EINTR):
            raise OSError(err, os.strerror(err))
        _wait(sock.fileno(), cancel, deadline)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return
