"""``unix:PATH``: the default transport between two daemons on one host, and migd's one unix listener.

``listen_unix`` is also what the QMP server binds its ``--qmp unix:PATH`` sockets with, so both replace
a stale socket file the same way and fail with the same (QEMU's) texts.
"""

from __future__ import annotations

import os
import socket
import stat

from migd.transports.base import SocketListener, TransportError
from migd.transports.channel import Channel, SocketChannel
from migd.transports.connecting import CONNECT_TIMEOUT, ConnectCancel, connect_socket
from migd.transports.uri import UnixURI


def connect(uri: UnixURI, cancel: ConnectCancel | None = None, timeout: float = CONNECT_TIMEOUT) -> Channel:
    """Connect to the socket file (calling thread; a full backlog is retried until cancel or timeout)."""
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


def listen_unix(path: str, *, backlog: int = 1, mode: int | None = None) -> socket.socket:
    """A non-blocking unix socket listening at ``path``, its file created with ``mode`` if given.

    Like QEMU, a stale socket file left by an earlier run is replaced (any other file is not: the bind
    fails). Raises TransportError with QEMU's text. (any thread)
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TransportError(f"Failed to unlink socket {path}: {exc.strerror}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if mode is not None:
            os.fchmod(sock.fileno(), mode)  # Linux: bind creates the file with the socket's mode
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)  # elsewhere the umask decides at bind: set it on the file too
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"Failed to bind socket to {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def listen(uri: UnixURI) -> UnixListener:
    return UnixListener(listen_unix(uri.path), uri.path)
