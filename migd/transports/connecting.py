"""Socket connects that another thread can abandon, and that give up by a deadline.

A blocking ``connect(2)`` to an address that never answers (a SYN black hole, a full backlog) holds
its thread for the kernel's two minutes of SYN retries, and closing the socket from another thread
does not wake it. Each migration connect runs on a worker thread, so a few cancelled migrations used to
starve every other command that needs one. Here the socket is non-blocking and the thread waits in
``poll(2)`` on the socket *and* on a :class:`ConnectCancel`'s wake-up: ``migrate_cancel`` frees the
thread at once, and a deadline bounds the wait when nobody cancels. Name resolution gets the same
treatment (:func:`resolve`): ``getaddrinfo(3)`` cannot be interrupted, and a silent DNS server holds it
for the resolver's timeouts (tens of seconds).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from typing import Any

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


AddrInfo = tuple[Any, ...]  # one getaddrinfo answer: (family, type, proto, canonname, sockaddr)


def resolve(host: str, port: int, cancel: ConnectCancel | None, timeout: float) -> list[AddrInfo]:
    """``getaddrinfo(host, port)`` for a stream socket, cancellable and bounded (calling thread).

    A literal address is converted at once. A name is looked up on a helper thread while the caller
    waits on the lookup's pipe and the cancel; abandoned by a cancel or the deadline, the lookup ends
    on the resolver's own timeout and its answer is dropped. Raises ``socket.gaierror``,
    :class:`ConnectCancelled`, or ``OSError(ETIMEDOUT)``.
    """
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass  # a name, not a literal address
    answer: list[list[AddrInfo] | BaseException] = []
    done_r, done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def lookup() -> None:  # (resolver thread)
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the waiting caller
            answer.append(exc)
        finally:
            try:
                os.write(done_w, b"x")
            except OSError:
                pass  # the caller gave up and closed its end
            os.close(done_w)

    threading.Thread(target=lookup, name="mig/resolve", daemon=True).start()
    try:
        waker = cancel.waker if cancel is not None else Waker()
        ready = waker.wait(done_r, select.POLLIN, timeout=timeout)
    finally:
        os.close(done_r)
    if ready is None:
        raise OSError(errno.ETIMEDOUT, f"address resolution of '{host}' timed out")
    if not ready or not answer:
        raise ConnectCancelled()
    result = answer[0]
    if isinstance(result, BaseException):
        raise result
    return result


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
