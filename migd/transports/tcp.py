"""``tcp:HOST:PORT``: IPv4 and IPv6; port 0 on the destination picks a free port."""

from __future__ import annotations

import socket
import time

from migd.transports.base import SocketListener, TransportError, tune_socket
from migd.transports.channel import Channel, SocketChannel
from migd.transports.connecting import CONNECT_TIMEOUT, ConnectCancel, ConnectCancelled, connect_socket
from migd.transports.uri import TcpURI


def connect(uri: TcpURI, cancel: ConnectCancel | None = None, timeout: float = CONNECT_TIMEOUT) -> Channel:
    """Connect to every address ``uri.host`` resolves to in turn (calling thread; cancellable)."""
    if not uri.host:
        raise TransportError(f"Failed to connect to '{uri.display()}': host not specified")
    try:
        infos = socket.getaddrinfo(uri.host, uri.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TransportError(f"address resolution failed for {uri.display()}: {exc.strerror}") from exc
    deadline = time.monotonic() + timeout
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
        return SocketChannel(sock)
    reason = error.strerror if error is not None and error.strerror else str(error)
    raise TransportError(f"Failed to connect to '{uri.display()}': {reason}")


class TcpListener(SocketListener):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        host, port = sock.getsockname()[:2]
        self.socket_address = [{"type": "inet", "host": host, "port": str(port)}]


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
            sock.listen(1)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        sock.setblocking(False)
        return TcpListener(sock)
    reason = error.strerror if error is not None and error.strerror else str(error)
    raise TransportError(f"Failed to bind socket to {uri.display()}: {reason}")
