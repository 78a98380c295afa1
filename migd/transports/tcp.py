"""``tcp:HOST:PORT``: IPv4 and IPv6; port 0 on the destination picks a free port.

Both ends of a migration connection use TCP keepalive (a dead or unreachable peer is noticed even while
nothing is sent), and ``set_peer_timeout`` bounds with ``TCP_USER_TIMEOUT`` how long sent data may stay
unacknowledged: migd's heartbeats see a stopped peer, these see a vanished one.
"""

from __future__ import annotations

import socket
import time

from migd.transports.base import BACKLOG, SocketListener, TransportError, tune_socket
from migd.transports.channel import Channel, SocketChannel
from migd.transports.connecting import (
    CONNECT_TIMEOUT,
    ConnectCancel,
    ConnectCancelled,
    connect_socket,
    resolve,
)
from migd.transports.uri import TcpURI

KEEPALIVE_IDLE = 5  # seconds of silence before the first probe
KEEPALIVE_INTERVAL = 1  # seconds between probes
KEEPALIVE_COUNT = 5  # unanswered probes before the kernel drops the connection


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def keepalive(sock: socket.socket) -> None:
    """Keepalive probes on a migration connection (best effort). TCP_USER_TIMEOUT is only set between
    migd peers (``set_peer_timeout``): a QEMU peer keeps QEMU's patience with a slow reader."""
    if not _is_tcp(sock):
        return
    for level, opt, value in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), KEEPALIVE_IDLE),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), KEEPALIVE_INTERVAL),
                              (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_COUNT)):
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass  # an option this kernel lacks: the heartbeats still notice a silent peer


def set_peer_timeout(channel: Channel, seconds: float) -> None:
    """TCP_USER_TIMEOUT = the migration's peer timeout, on a tcp channel (no-op for anything else)."""
    opt = getattr(socket, "TCP_USER_TIMEOUT", None)
    inner = getattr(channel, "inner", channel)  # a wrapped channel (migd.migration.heartbeat)
    if opt is None or not isinstance(inner, SocketChannel) or not _is_tcp(inner.sock):
        return
    try:
        inner.sock.setsockopt(socket.IPPROTO_TCP, opt, max(1, int(seconds * 1000)))
    except OSError:
        pass


def connect(uri: TcpURI, cancel: ConnectCancel | None = None, timeout: float = CONNECT_TIMEOUT) -> Channel:
    """Connect to every address ``uri.host`` resolves to in turn (calling thread; cancellable)."""
    if not uri.host:
        raise TransportError(f"Failed to connect to '{uri.display()}': host not specified")
    deadline = time.monotonic() + timeout
    try:
        infos = resolve(uri.host, uri.port, cancel, timeout)
    except socket.gaierror as exc:
        raise TransportError(f"address resolution failed for {uri.display()}: {exc.strerror}") from exc
    except OSError as exc:  # cancelled, or the deadline passed while the resolver said nothing
        raise TransportError(f"Failed to connect to '{uri.display()}': {exc.strerror}") from exc
    error: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            connect_socket(sock, addr, cancel, deadline - time.monotonic())
        except ConnectCancelled as exc:
            sock.close()
            raise TransportError(f"Failed to connect to '{uri.display()}': {exc.strerror}") from exc
        except OSError as exc:
            sock.close()
            error = exc
            continue
        tune_socket(sock)
        keepalive(sock)
        return SocketChannel(sock)
    reason = error.strerror if error is not None and error.strerror else str(error)
    raise TransportError(f"Failed to connect to '{uri.display()}': {reason}")


class TcpListener(SocketListener):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        host, port = sock.getsockname()[:2]
        self.socket_address = [{"type": "inet", "host": host, "port": str(port)}]

    def accept(self) -> Channel:
        channel = super().accept()
        if isinstance(channel, SocketChannel):
            keepalive(channel.sock)
        return channel


def listen(uri: TcpURI) -> TcpListener:
    host = uri.host or None  # "" = every address, IPv6 included where available
    try:
        infos = socket.getaddrinfo(host, uri.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TransportError(f"address resolution failed for {uri.display()}: {exc.strerror}") from exc
    # prefer IPv6 for the wildcard (dual stack), otherwise the first answer
    infos.sort(key=lambda info: 0 if (host is None and info[0] == socket.AF_INET6) else 1)
    error: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setblocking(False)
        return TcpListener(sock)
    reason = error.strerror if error is not None and error.strerror else str(error)
    raise TransportError(f"Failed to bind socket to {uri.display()}: {reason}")
