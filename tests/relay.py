"""A forwarding relay between a migration source and its destination, for tests that watch or break
single connections: it records each connection's first bytes, can answer one connection with junk or
with silence, and keeps every socket (``socks``: accepted end, then the destination end, per connection
in order) so a test can cut one of them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

JUNK = b"HTTP/1.0 400 this is no TLS server\r\n\r\n"


class Relay:
    """Relays up to ``limit`` connections from ``server`` to what ``connect`` opens. Connection number
    ``sabotage`` (0 = the first, the main channel) gets JUNK both ways, or nothing at all if ``silent``."""

    def __init__(self, server: socket.socket, connect: Callable[[], socket.socket], sabotage: int | None = None,
                 silent: bool = False, limit: int = 8) -> None:
        self.server = server
        self.connect = connect
        self.sabotage = sabotage
        self.silent = silent
        self.limit = limit
        self.first: dict[int, bytes] = {}  # connection number -> the source's first two bytes
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @classmethod
    def tcp(cls, port: int, sabotage: int | None = None, silent: bool = False, limit: int = 8) -> Relay:
        """A relay on a free 127.0.0.1 port to 127.0.0.1:``port`` (its own port in ``.port``)."""
        return cls(socket.create_server(("127.0.0.1", 0)),
                   lambda: socket.create_connection(("127.0.0.1", port), timeout=10), sabotage, silent, limit)

    @classmethod
    def unix(cls, path: str, target: str, sabotage: int | None = None, silent: bool = False,
             limit: int = 8) -> Relay:
        """A relay listening on unix socket ``path`` to the one at ``target``."""
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(8)

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
            return s

        return cls(server, connect, sabotage, silent, limit)

    @property
    def port(self) -> int:
        return int(self.server.getsockname()[1])

    def _serve(self) -> None:
        for n in range(self.limit):
            try:
                c, _ = self.server.accept()
            except OSError:
                return
            if n == self.sabotage and self.silent:
                with self.lock:
                    self.socks.append(c)
                continue
            try:
                d = self.connect()
            except OSError as exc:
                print("relay connect:", exc, flush=True)  # shown with a failure
                c.close()
                return
            with self.lock:
                self.socks += [c, d]
            if n == self.sabotage:
                for s in (c, d):
                    try:
                        s.sendall(JUNK)
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                continue
            threading.Thread(target=self._pump, args=(n, c, d), daemon=True).start()
            threading.Thread(target=self._pump, args=(None, d, c), daemon=True).start()

    def _pump(self, n: int | None, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._stop.is_set() and (data := a.recv(1 << 16)):
                if n is not None and n not in self.first:
                    self.first[n] = data[:2]
                b.sendall(data)
        except OSError as exc:
            if not self._stop.is_set():
                print("relay pump:", exc, flush=True)  # shown with a failure: what ended a connection
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        with self.lock:
            for s in self.socks:
                s.close()
