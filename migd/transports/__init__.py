"""Transports: turn a migration address into a connected Channel (source) or a Listener (destination).

One module per transport, as in QEMU; this package only dispatches. ``connect`` and ``Listener.accept``
block, so the migration and incoming threads call them off the event loop. Every failure is a
:class:`TransportError` whose ``str()`` is QEMU's text, ready to become ``error-desc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import select
import socket
import threading
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from migd.backoff import RESOURCE_ERRNOS, TRANSIENT_ERRNOS, Backoff, LogLimiter
from migd.transports.connecting import CONNECT_TIMEOUT, ConnectCancel
from migd.transports.uri import (
    ExecURI,
    FdURI,
    FileURI,
    MigrationURI,
    TcpURI,
    UnixURI,
    URIError,
    parse_channels,
    parse_uri,
)

if TYPE_CHECKING:
    from migd.transports.channel import Channel

__all__ = [
    "CONNECT_TIMEOUT",
    "ConnectCancel",
    "Listener",
    "MigrationURI",
    "SocketListener",
    "TransportError",
    "URIError",
    "connect",
    "listen",
    "parse_channels",
    "parse_uri",
    "resolve",
]

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
    on the socket and on a wake-up pipe that ``close()`` writes to. Out of descriptors, it waits
    (back-off up to 1 s, logged at most once a second) and tries again rather than spinning or failing.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._lock = threading.Lock()

    def accept(self) -> Channel:
        from migd.transports.channel import SocketChannel

        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        idle = select.poll()  # while backing off: only the wake-up pipe
        idle.register(self._wake_r, select.POLLIN)
        backoff, errors = Backoff(), LogLimiter(log)
        while True:
            if self._closed:
                raise TransportError("Listener closed before a connection arrived")
            try:
                ready = dict(poller.poll())
            except InterruptedError:
                continue
            if self._wake_r in ready or self._closed:
                raise TransportError("Listener closed before a connection arrived")
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno in TRANSIENT_ERRNOS:
                    continue
                if exc.errno not in RESOURCE_ERRNOS:
                    raise TransportError(f"Failed to accept connection: {exc.strerror or exc}") from exc
                delay = backoff.next()
                errors.warning("incoming accept failed: %s; retrying in %.2f s", exc.strerror, delay)
                with contextlib.suppress(InterruptedError):
                    idle.poll(int(delay * 1000))
                continue
            conn.setblocking(True)
            tune_socket(conn)
            return SocketChannel(conn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_w, b"x")
        self._sock.close()
        self._cleanup()
        # the pipe is left for the garbage collector: a concurrent accept may still be polling it

    def _cleanup(self) -> None:
        """Hook for subclasses (a unix listener removes its socket file)."""

    def __del__(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class Waker:
    """A pipe that lets ``close()`` wake a thread waiting in poll(2) for a descriptor to be readable."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.closed = False

    def wait_readable(self, fd: int) -> None:
        """Return once ``fd`` has data (or EOF/hang-up); raise if ``wake()`` was called."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._r, select.POLLIN)
        while not self.closed:
            try:
                ready = dict(poller.poll())
            except InterruptedError:
                continue
            if self._r in ready or self.closed:
                break
            if ready:
                return
        raise TransportError("Listener closed before a connection arrived")

    def wake(self) -> None:
        if not self.closed:
            self.closed = True
            os.write(self._w, b"x")

    def __del__(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


PIPE_SIZE = 1 << 20  # a 64 KiB pipe costs a system call and a context switch per 64 KiB of stream
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def grow_pipe(fd: int) -> None:
    """Enlarge a pipe's buffer (up to the system's pipe-max-size); not possible is not an error."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


def tune_socket(sock: socket.socket) -> None:
    """Small return-path messages (PONG, SHUT) must not wait for Nagle."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def resolve(uri: str | None = None, channels: list[Any] | None = None, *, incoming: bool = False) -> MigrationURI:
    """The address of ``migrate``/``migrate-incoming``: exactly one of ``uri`` and ``channels``."""
    if (uri is None) == (channels is None):
        raise URIError("need either 'uri' or 'channels' argument")
    if channels is not None:
        return parse_channels(channels, incoming=incoming)
    assert uri is not None
    return parse_uri(uri)


def _as_uri(uri: str | MigrationURI) -> MigrationURI:
    return parse_uri(uri) if isinstance(uri, str) else uri


# the module implementing each kind of address (imported on first use: they import this package)
_MODULES: dict[type, str] = {TcpURI: "tcp", UnixURI: "unix", ExecURI: "exec", FdURI: "fd", FileURI: "file"}


def _transport(parsed: MigrationURI, uri: str | MigrationURI) -> Any:
    name = _MODULES.get(type(parsed))
    if name is None:
        raise URIError(f"unknown migration protocol: {uri}")
    return importlib.import_module(f"{__name__}.{name}")


def connect(
    uri: str | MigrationURI,
    fds: Fds | None = None,
    cancel: ConnectCancel | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Channel:
    """Open the source end of a migration (blocking). ``fds`` are the QMP session's getfd names.

    A socket connect gives up after ``timeout`` seconds, and at once when ``cancel.cancel()`` is
    called from another thread (so a cancelled migration never keeps its worker thread).
    """
    parsed = _as_uri(uri)
    module = _transport(parsed, uri)
    if isinstance(parsed, FdURI):
        return module.connect(parsed, fds)  # type: ignore[no-any-return]
    if isinstance(parsed, (TcpURI, UnixURI)):
        return module.connect(parsed, cancel, timeout)  # type: ignore[no-any-return]
    return module.connect(parsed)  # type: ignore[no-any-return]


def listen(uri: str | MigrationURI, fds: Fds | None = None) -> Listener:
    """Open the destination end of a migration: listening already, accepting later."""
    parsed = _as_uri(uri)
    module = _transport(parsed, uri)
    return module.listen(parsed, fds) if isinstance(parsed, FdURI) else module.listen(parsed)
