"""Channels: the byte pipes a migration stream runs over, with blocking I/O that another thread can stop.

The migration thread writes (and the incoming thread reads) with plain blocking calls outside the big
lock; ``migrate_cancel`` on the event loop must still be able to make such a call fail at once. A socket
does that with ``shutdown(2)``; a pipe has no such call, so an ``FdChannel`` keeps its descriptor
non-blocking and waits in ``poll`` on the descriptor *and* a Waker (``wake.py``) that ``shutdown`` wakes.
Errors surface as ``OSError``; the stream turns them into its sticky error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import threading
from collections.abc import Sequence
from typing import Any

from migd.transports.wake import Waker

IOV_MAX = 1024  # Linux's limit on buffers per sendmsg/writev
SNDBUF = 4 << 20  # measured best for the page loop (capped by net.core.wmem_max)
RCVBUF = 8 << 20
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size


def _shut_error() -> OSError:
    return OSError(errno.ESHUTDOWN, "Channel was shut down")


class Channel:
    """A blocking byte channel: vectored writes, reads into caller memory, shutdown from any thread."""

    has_return_path: bool = False
    name: str = "channel"

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        """Write from up to ``IOV_MAX`` buffers in one call; returns bytes written (may be short)."""
        raise NotImplementedError

    def read_into(self, mv: Any) -> int:
        """Read into ``mv`` what is available (blocking for at least one byte); 0 means end of stream."""
        raise NotImplementedError

    def read_vectored(self, bufs: Sequence[Any]) -> int:
        """Read into up to ``IOV_MAX`` buffers in order (blocking for at least one byte); 0 means end
        of stream. This default fills the first buffer only; sockets scatter (``recvmsg_into``)."""
        return self.read_into(bufs[0])

    def shutdown(self) -> None:
        """Make blocked and future I/O fail at once. Safe from any thread, idempotent."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the descriptor. Call once no other thread uses the channel."""
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def write_all(self, bufs: Sequence[Any]) -> int:
        """Write every byte of ``bufs`` (looping over short writes); returns the total."""
        pending = [memoryview(b).cast("B") for b in bufs if len(b)]
        total = 0
        while pending:
            n = self.write_vectored(pending[:IOV_MAX])
            total += n
            while n and pending:
                head = pending[0]
                if n >= len(head):
                    n -= len(head)
                    pending.pop(0)
                else:
                    pending[0] = head[n:]
                    n = 0
        return total

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChannelFilter(Channel):
    """A channel over another one that passes everything through: a subclass overrides what it
    watches or changes (heartbeat.WatchedChannel, loadpace.LoadMeter, test channels that cut or
    corrupt). Runs on whichever thread uses the inner channel."""

    def __init__(self, inner: Channel) -> None:
        self.inner = inner
        self.name = inner.name
        self.has_return_path = inner.has_return_path

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        return self.inner.write_vectored(bufs)

    def read_into(self, mv: Any) -> int:
        return self.inner.read_into(mv)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def close(self) -> None:
        self.inner.close()

    def fileno(self) -> int:
        return self.inner.fileno()


class SocketChannel(Channel):
    """A connected stream socket (tcp, unix, or an fd: socket). Bidirectional, so it has a return path."""

    has_return_path = True

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.name = "socket"
        self._shut = False
        sock.setblocking(True)
        for opt, size in ((socket.SO_SNDBUF, SNDBUF), (socket.SO_RCVBUF, RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass  # not every socket type or sandbox allows it; the default still works

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        if self._shut:
            raise _shut_error()
        return self.sock.sendmsg(bufs[:IOV_MAX] if len(bufs) > IOV_MAX else bufs)

    def read_into(self, mv: Any) -> int:
        if self._shut:
            raise _shut_error()
        return self.sock.recv_into(mv)

    def try_read_into(self, mv: Any) -> int | None:
        """Read into ``mv`` what the socket holds without waiting: None when it holds nothing yet,
        0 at the end of the stream (whichever thread reads the channel)."""
        if self._shut:
            raise _shut_error()
        try:
            return self.sock.recv_into(mv, 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def read_vectored(self, bufs: Sequence[Any]) -> int:
        if type(self).read_into is not SocketChannel.read_into:  # a subclass reads through a layer (TLS)
            return self.read_into(bufs[0])
        if self._shut:
            raise _shut_error()
        return self.sock.recvmsg_into(bufs[:IOV_MAX] if len(bufs) > IOV_MAX else bufs)[0]

    def shutdown(self) -> None:
        self._shut = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected: nothing left to wake

    def close(self) -> None:
        self._shut = True
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()


class FdChannel(Channel):
    """A pipe or file descriptor (exec:, file:, a non-socket fd:). One direction only: no return path.

    The descriptor is switched to non-blocking so a wait can be interrupted: every call tries the I/O,
    and on EAGAIN polls the descriptor together with a private Waker. Regular files never return
    EAGAIN, so they cost nothing extra.
    """

    has_return_path = False

    def __init__(self, fd: int, *, close_fd: bool = True, name: str = "fd") -> None:
        self.fd = fd
        self.name = name
        self._close_fd = close_fd
        self._closed = False
        self._lock = threading.Lock()
        self._waker = Waker()
        os.set_blocking(fd, False)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            try:  # a 64 KiB pipe means a system call per 64 KiB; ask for more
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size for an unprivileged process: keep the default

    @property
    def _shut(self) -> bool:
        return self._waker.woken

    def _wait(self, events: int) -> None:
        if not self._waker.wait(self.fd, events):
            raise _shut_error()

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        if len(bufs) > IOV_MAX:
            bufs = bufs[:IOV_MAX]
        while True:
            if self._shut:
                raise _shut_error()
            try:
                return os.writev(self.fd, bufs)
            except BlockingIOError:
                self._wait(select.POLLOUT)

    def read_into(self, mv: Any) -> int:
        while True:
            if self._shut:
                raise _shut_error()
            try:
                return os.readv(self.fd, [mv])
            except BlockingIOError:
                self._wait(select.POLLIN)

    def shutdown(self) -> None:
        self._waker.wake()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._waker.release()  # counts as woken: later I/O fails at once
            if self._close_fd:
                os.close(self.fd)

    def fileno(self) -> int:
        return self.fd
