"""What the transport modules share: the error type, the listener interface, an interruptible socket listener.

Each transport module (tcp, unix, exec, fd, file) builds on these; the package ``__init__`` only
dispatches an address to its module.
"""

from __future__ import annotations

import logging
import select
import socket
from collections.abc import MutableMapping

from migd.backoff import RESOURCE_ERRNOS, TRANSIENT_ERRNOS, Backoff, LogLimiter
from migd.transports.channel import Channel, SocketChannel
from migd.transports.wake import Waker

# a migration listener's backlog: the main channel and up to 255 multifd channels (QEMU's maximum) connect
# at once; with a backlog of 1 a tcp SYN that found the queue full waited for its 1 s retransmission
BACKLOG = 256

Fds = MutableMapping[str, int]
log = logging.getLogger(__name__)


class TransportError(OSError):
    """Connecting, listening or accepting failed; ``str()`` is the QEMU-style description."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc

    def __str__(self) -> str:
        return self.desc


class Listener:
    """The destination end: ``accept()`` blocks until the source arrives or ``close()`` is called."""

    socket_address: list[dict[str, str]] = []

    def accept(self) -> Channel:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SocketListener(Listener):
    """A listening socket whose blocking accept can be interrupted from another thread.

    Closing a socket does not wake a thread blocked in accept(2) on Linux, so accept waits in poll(2)
    on the socket and on a Waker that ``close()`` wakes. Out of descriptors, it waits (back-off up to 1 s, logged at most
    once a second) and tries again rather than spinning or failing.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._waker = Waker()  # never released: a concurrent accept may still poll it after close()

    def accept(self) -> Channel:
        """Wait for the source and return its connection. (incoming thread)"""
        fd = self._sock.fileno()  # -1 once closed; close() wakes before it closes the socket
        backoff, errors = Backoff(), LogLimiter(log)
        while True:
            if fd < 0 or not self._waker.wait(fd, select.POLLIN):
                raise TransportError("Listener closed before a connection arrived")
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if self._waker.woken:  # closed between the poll and the accept
                    raise TransportError("Listener closed before a connection arrived") from exc
                if exc.errno in TRANSIENT_ERRNOS:
                    continue
                if exc.errno not in RESOURCE_ERRNOS:
                    raise TransportError(f"Failed to accept connection: {exc.strerror or exc}") from exc
                # out of descriptors: the connection stays queued; wait (woken by close) and retry
                delay = backoff.next()
                errors.warning("incoming accept failed: %s; retrying in %.2f s", exc.strerror, delay)
                self._waker.wait(None, timeout=delay)
                continue
            backoff.reset()
            conn.setblocking(True)
            tune_socket(conn)
            return SocketChannel(conn)

    @property
    def waker(self) -> Waker:
        """Woken by ``close()``: a TLS handshake on an accepted socket waits on it too."""
        return self._waker

    def close(self) -> None:
        """Stop listening and interrupt a waiting ``accept``. Idempotent. (any thread)"""
        if not self._waker.wake():
            return  # closed already
        self._sock.close()
        self._cleanup()

    def _cleanup(self) -> None:
        """Hook for subclasses (a unix listener removes its socket file)."""


def tune_socket(sock: socket.socket) -> None:
    """Small return-path messages (PONG, SHUT) must not wait for Nagle."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
