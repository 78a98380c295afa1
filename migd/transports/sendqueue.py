"""What the peer has not read yet: the bytes in a socket's send queue.

The switch-over waits for the destination's LOADED, and the destination loads the final pass only
after whatever the stream still holds ahead of it. With no rate limit the source fills the socket
buffers (4 MiB each way) far faster than a loaded destination drains them, so a PONG can come back
hundreds of milliseconds late while the round trip itself is a fraction of one. The kernel knows
how much is queued: ``TIOCOUTQ`` (``SIOCOUTQ``) on the sending socket — for a unix stream socket
everything the peer has not read (each chunk's memory stays charged to the sender until then), for
TCP what is not acknowledged yet (data already in the receiver's queue is not counted). The policy
times a PING against the bytes queued ahead of it (the destination's drain pace) and counts the
backlog at the switch-over (docs/SWITCHOVER.md §1); page references spliced into a unix socket
(`zerocopy.SpliceSender`) stay guest memory until the peer read them, so the sender waits for an
empty queue before the guest may write again.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import Protocol


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def queued_bytes(channel: _HasFileno) -> int:
    """(any thread) Bytes written to ``channel`` that the peer has not read (unix) or acknowledged
    (TCP); 0 where the descriptor cannot tell (a file, a pipe, a closed channel)."""
    try:
        raw = fcntl.ioctl(channel.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError, NotImplementedError):
        return 0
    return max(0, int(struct.unpack("i", raw)[0]))
