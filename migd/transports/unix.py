"""``unix:PATH``: the default transport between two daemons on one host, and migd's one unix listener.

``listen_unix`` is also what the QMP server binds its ``--qmp unix:PATH`` sockets with, so both replace
a stale socket file the same way and fail with the same (QEMU's) texts.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

from migd.transports.base import BACKLOG, SocketListener, TransportError
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


_SUN_PATH_MAX = 107  # bytes of a unix socket path, without the final NUL


def listen_unix(path: str, *, backlog: int = 1, mode: int | None = None) -> socket.socket:
    """A non-blocking unix socket listening at ``path``, its file created with ``mode`` if given.

    A stale socket file left by an earlier run is replaced; a live one (something accepts on it) is
    never taken over, nor is any other file. The socket is bound and listening under a temporary name
    and then renamed into place, so ``path`` never exists without accepting connections. Raises
    TransportError with QEMU's text. (any thread)
    """
    _refuse_live_socket(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    if len(os.fsencode(tmp)) > _SUN_PATH_MAX:
        tmp = path  # no room for a temporary name: bind in place (the path appears just before listen)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if mode is not None:
            os.fchmod(sock.fileno(), mode)  # Linux: bind creates the file with the socket's mode
        sock.bind(tmp)
        try:
            if mode is not None:
                os.chmod(tmp, mode)  # elsewhere the umask decides at bind: set it on the file too
            sock.listen(backlog)
            if tmp != path:
                os.rename(tmp, path)  # atomic: the path appears already accepting
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        sock.close()
        raise TransportError(f"Failed to bind socket to {path}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def _refuse_live_socket(path: str) -> None:
    """Remove ``path`` if it is a socket nobody accepts on; refuse if it is live or not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TransportError(f"Failed to bind socket to {path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):  # what bind(2) itself says of an existing file
        raise TransportError(f"Failed to bind socket to {path}: {os.strerror(errno.EADDRINUSE)}") from \
            FileExistsError(errno.EEXIST, "the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: its daemon is gone
    except OSError as exc:
        raise TransportError(f"Failed to bind socket to {path}: {exc.strerror or exc}") from exc
    else:
        raise TransportError(f"Failed to bind socket to {path}: {os.strerror(errno.EADDRINUSE)} "
                             "(another process serves this socket)") from \
            OSError(errno.EADDRINUSE, "Address already in use (another process serves this socket)")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TransportError(f"Failed to unlink socket {path}: {exc.strerror}") from exc


def listen(uri: UnixURI) -> UnixListener:
    return UnixListener(listen_unix(uri.path, backlog=BACKLOG), uri.path)
