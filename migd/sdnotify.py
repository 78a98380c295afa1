"""systemd's readiness protocol: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

A few lines instead of a dependency. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op,
and a failure to notify is never fatal: the daemon works the same without a supervisor.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=running"``); True if a supervisor got them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":  # abstract namespace
        address = "\0" + address[1:]
    elif address[0] != "/":
        return False  # vsock and other address kinds are not supported
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", address, exc)
        return False
    return True
