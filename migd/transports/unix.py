"""``unix:PATH``: the default transport between two daemons on one host."""

from __future__ import annotations

import os
import socket
import stat
from typing import TYPE_CHECKING

from migd.transports import SocketListener, TransportError
from migd.transports.connecting import CONNECT_TIMEOUT, ConnectCancel, connect_socket
from migd.transports.uri import UnixURI

if TYPE_CHECKING:
    from migd.transports.channel import Channel


def connect(uri: UnixURI, cancel: ConnectCancel | None = None, timeout: float = CONNECT_TIMEOUT) -> Channel:
    """Connect to the socket file (calling thread; a full backlog is retried until cancel or timeout)."""
    from migd.transports.channel import SocketChannel

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connect_socket(sock, uri.path, cancel, timeout)
    except OSError as exc:
        sock.close()
        raise TransportError(f"Failed to connect to '{uri.path}': {exc.strerror or exc}") from exc
    return SocketChannel(sock)


class UnixListener(SocketListener):
    """Removes the socket file it created on close (only if it is still the same file)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        super().__init__(sock)
        self.path = path
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self.socket_address = [{"type": "unix", "path": path}]

    def _cleanup(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def listen(uri: UnixURI) -> UnixListener:
    path = uri.path
    try:  # like QEMU: a stale socket file left by an earlier run is replaced
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TransportError(f"Failed to unlink socket {path}: {exc.strerror}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise TransportError(f"Failed to bind socket to {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return UnixListener(sock, path)
