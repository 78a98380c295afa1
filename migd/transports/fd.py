"""``fd:NAME``: a descriptor handed over earlier with ``getfd`` (SCM_RIGHTS on the QMP socket).

The migration takes the descriptor out of the session's table, like QEMU's monitor_get_fd, so it is
owned (and closed) by exactly one channel. A decimal name is a descriptor the daemon inherited, as in
QEMU. A socket becomes a SocketChannel (with a return path), anything else (pipe, file) an FdChannel.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import MutableMapping

from migd.transports.base import Listener, TransportError
from migd.transports.channel import Channel, FdChannel, SocketChannel
from migd.transports.uri import FdURI
from migd.transports.wake import Waker


def _take(uri: FdURI, fds: MutableMapping[str, int] | None) -> int:
    if uri.name.isascii() and uri.name.isdigit():
        fd = int(uri.name)
    elif fds is not None and uri.name in fds:
        fd = fds.pop(uri.name)
    else:
        raise TransportError(f"File descriptor named '{uri.name}' has not been found")
    try:
        os.fstat(fd)
    except OSError as exc:
        raise TransportError(f"File descriptor '{uri.name}' is not usable: {exc.strerror}") from exc
    return fd


def _channel(fd: int) -> Channel:
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        sock = socket.socket(fileno=fd)
        sock.setblocking(True)
        return SocketChannel(sock)
    return FdChannel(fd)  # which enlarges a pipe's buffer


def connect(uri: FdURI, fds: MutableMapping[str, int] | None) -> Channel:
    return _channel(_take(uri, fds))


class FdListener(Listener):
    """The descriptor is already connected: like QEMU, ``accept`` returns it (once) when the source
    starts sending, so the status stays ``setup`` until then."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self.socket_address = []
        self._waker = Waker()

    def accept(self) -> Channel:
        if self._fd is None:
            raise TransportError("fd: the descriptor was already taken or closed")
        if not self._waker.wait(self._fd):
            raise TransportError("Listener closed before a connection arrived")
        fd, self._fd = self._fd, None
        return _channel(fd)

    def close(self) -> None:
        self._waker.wake()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def listen(uri: FdURI, fds: MutableMapping[str, int] | None) -> FdListener:
    return FdListener(_take(uri, fds))
