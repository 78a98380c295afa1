"""``file:PATH[,offset=N]``: save the stream to a file, or restore a machine from one.

Like QEMU, the source truncates the file to ``offset`` (keeping what precedes it) and writes from there;
the destination reads from ``offset``. A file has no return path.
"""

from __future__ import annotations

import os

from migd.transports.base import Listener, TransportError
from migd.transports.channel import Channel, FdChannel
from migd.transports.uri import FileURI


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise TransportError(f"Unable to open {path}: {exc.strerror}") from exc


def connect(uri: FileURI) -> Channel:
    fd = _open(uri.path, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, uri.offset)
        os.lseek(fd, uri.offset, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise TransportError(f"Unable to prepare {uri.path} at offset {uri.offset}: {exc.strerror}") from exc
    return FdChannel(fd)


class FileListener(Listener):
    """The file is opened at once (a missing file fails ``migrate-incoming``); accept hands it out."""

    def __init__(self, uri: FileURI) -> None:
        self.uri = uri
        self.socket_address = []
        self._fd: int | None = _open(uri.path, os.O_RDONLY)
        try:
            os.lseek(self._fd, uri.offset, os.SEEK_SET)
        except OSError as exc:
            self.close()
            raise TransportError(f"Unable to seek {uri.path} to offset {uri.offset}: {exc.strerror}") from exc

    def accept(self) -> Channel:
        if self._fd is None:
            raise TransportError("file: the file was already taken or closed")
        fd, self._fd = self._fd, None
        return FdChannel(fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def listen(uri: FileURI) -> FileListener:
    return FileListener(uri)
