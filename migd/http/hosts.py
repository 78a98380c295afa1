"""Answer only for the Host names the endpoint serves: no DNS rebinding.

A web page on ``evil.example`` whose name is re-pointed at 127.0.0.1 makes the victim's browser talk
to the loopback endpoint while sending ``Host: evil.example:PORT``, and the same-origin policy then
lets the page read the answers (metrics, migration state). Refusing every Host that is not one of
ours (the bound address, the loopback names, with our port) closes that hole; a non-browser client
that sends no Host at all is not a browser under such an attack and is served.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _split(host: str) -> tuple[str, int | None]:
    """``name[:port]`` or ``[v6][:port]`` -> (lower-case name without brackets, port or None)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    if not port:
        return name.rstrip("."), None
    return name.rstrip("."), int(port) if port.isascii() and port.isdigit() else -1


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """The Host names one endpoint serves; ``configure`` once its real address is known (event loop)."""

    def __init__(self) -> None:
        self.port = 0
        self.names: set[str] = set(LOOPBACK_NAMES)
        self.any_ip = False

    def configure(self, host: str, port: int) -> None:
        """Bound to ``host``:``port``: a wildcard bind also serves any IP literal and this host's name."""
        self.port = port
        if host in WILDCARDS:
            self.any_ip = True
            self.names.add(socket.gethostname().lower())
        else:
            self.names.add(host.strip("[]").lower())

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header is for us."""
        if header is None:
            return True
        name, port = _split(header)
        if port is None:
            port = 80
        if port != self.port:
            return False
        return name in self.names or (self.any_ip and _is_ip(name))


def host_middleware(check: HostCheck) -> Middleware:
    """An aiohttp middleware answering 421 Misdirected Request for a Host that is not ours."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not check.allows(request.headers.get("Host")):
            return web.Response(status=421, text="421 Misdirected Request: unknown Host\n")
        return await handler(request)

    return middleware
