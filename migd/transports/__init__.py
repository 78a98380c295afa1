"""Transports: turn a migration address into a connected Channel (source) or a Listener (destination).

One module per transport, as in QEMU; this package only dispatches. ``connect`` and ``Listener.accept``
block, so the migration and incoming threads call them off the event loop. Every failure is a
:class:`TransportError` whose ``str()`` is QEMU's text, ready to become ``error-desc``.
"""

from __future__ import annotations

from typing import Any

from migd.transports import exec as exec_transport
from migd.transports import fd, file, tcp, unix
from migd.transports.base import Fds, Listener, SocketListener, TransportError
from migd.transports.channel import Channel
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
    if isinstance(parsed, TcpURI):
        return tcp.connect(parsed, cancel, timeout)
    if isinstance(parsed, UnixURI):
        return unix.connect(parsed, cancel, timeout)
    if isinstance(parsed, ExecURI):
        return exec_transport.connect(parsed)
    if isinstance(parsed, FdURI):
        return fd.connect(parsed, fds)
    if isinstance(parsed, FileURI):
        return file.connect(parsed)
    raise URIError(f"unknown migration protocol: {uri}")


def listen(uri: str | MigrationURI, fds: Fds | None = None) -> Listener:
    """Open the destination end of a migration: listening already, accepting later."""
    parsed = _as_uri(uri)
    if isinstance(parsed, TcpURI):
        return tcp.listen(parsed)
    if isinstance(parsed, UnixURI):
        return unix.listen(parsed)
    if isinstance(parsed, ExecURI):
        return exec_transport.listen(parsed)
    if isinstance(parsed, FdURI):
        return fd.listen(parsed, fds)
    if isinstance(parsed, FileURI):
        return file.listen(parsed)
    raise URIError(f"unknown migration protocol: {uri}")
