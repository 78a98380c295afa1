"""Turning the operator's ``-s`` argument into an address ``qemu.qmp`` can connect to.

QEMU's own tools accept a bare path for a unix socket and ``HOST:PORT`` for TCP; migd's daemon spells its
listeners ``unix:PATH`` / ``tcp:HOST:PORT``. Accepting both means an operator can paste either form.
"""

from __future__ import annotations


class AddressError(ValueError):
    pass


QMPAddress = str | tuple[str, int]


def parse_address(text: str) -> QMPAddress:
    """``unix:PATH`` or a path -> str; ``tcp:HOST:PORT`` or ``HOST:PORT`` -> (host, port)."""
    if not text:
        raise AddressError("empty QMP socket address")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise AddressError("unix: address without a path")
        return path
    tcp = text.startswith("tcp:")
    rest = text[len("tcp:") :] if tcp else text
    if not tcp and ("/" in rest or ":" not in rest):
        return rest  # a plain socket path
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise AddressError(f"invalid TCP address '{text}': expected HOST:PORT")
    host = host.strip("[]")  # [::1]:4444
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"invalid port '{port}' in '{text}'")
    return host, int(port)
