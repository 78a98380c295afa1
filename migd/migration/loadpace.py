"""[migd] The destination's load pace, measured where it reads and reported on the return path.

The source cannot see how fast the destination loads: under a rate limit its writes land in socket
buffers, and once its vCPUs stop, the backlog and the final pass drain at the destination's pace
(docs/SWITCHOVER.md §1). So the destination measures it itself: the bytes its incoming thread read,
and how long it *waited* for them (the channel empty), since it accepted the connection; the rest of
its time is busy time, spent loading (the kernel's copy into guest RAM or the stream buffer
included). bytes / busy is the pace it can load at when the source keeps up; the pages it loaded tell
spans of data pages from spans of zero pages (which cost work but few bytes); its CPU time, read once
per report, tells how fast it loads when nothing else wants its CPU (the source's vCPUs stopped).

Cheap by construction: a read first tries ``MSG_DONTWAIT``; only when that finds the socket empty
is the blocking read that follows timed as a wait. A full socket — the destination the slower end,
the case the pace matters for — costs no system call more than before; an empty one costs one
``EAGAIN`` while the thread would wait anyway. A report goes out at most every ``INTERVAL`` while
reads complete (and the incoming thread adds one after each PONG). Only a plain socket is
metered: TLS and wrapped channels are not (the destination then does not accept LOAD_PACE).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from migd.transports.channel import Channel, ChannelFilter, SocketChannel

INTERVAL = 0.05  # s between reports while pages flow, at least


class LoadMeter(ChannelFilter):
    """A channel whose reads count bytes and the time spent waiting for them (incoming thread)."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(inner)
        # exactly a plain socket: a subclass reads through a layer (TLS) that MSG_DONTWAIT skips
        self._socket = inner if type(inner) is SocketChannel else None
        self.start = time.monotonic()
        self.last_read_at = self.start  # when the last read returned: what the parser holds came then
        self.bytes_read = 0
        self.wait_s = 0.0
        self._last_report = self.start
        self._cpu_start = time.thread_time()  # made on the incoming thread, which reads through it
        self.pages: Callable[[], int] = lambda: 0  # RAM pages loaded so far (the incoming thread sets it)
        # (bytes, pages, busy us, wait us, cpu us, PING, held us), once the source agreed to LOAD_PACE
        self.report: Callable[[int, int, int, int, int, int, int], None] | None = None

    @property
    def exact(self) -> bool:
        """Whether waits are told from work (a plain socket): only then is the pace worth reporting."""
        return self._socket is not None

    def totals(self, now: float | None = None) -> tuple[int, int, int, int, int]:
        """(bytes read, pages loaded, busy us, waiting us, CPU us) since the start (incoming thread)."""
        now = time.monotonic() if now is None else now
        busy = max(0.0, now - self.start - self.wait_s)
        cpu = max(0.0, time.thread_time() - self._cpu_start)
        return self.bytes_read, self.pages(), int(busy * 1e6), int(self.wait_s * 1e6), int(cpu * 1e6)

    def held(self, now: float | None = None) -> float:
        """Seconds since the last read: how long what the parser reaches now waited here, loaded
        after what came before it (a PING's bytes arrive with the last read before it is parsed:
        reads happen only once the parser needs bytes it has not got). (incoming thread)"""
        return max(0.0, (time.monotonic() if now is None else now) - self.last_read_at)

    def send_report(self, now: float | None = None, ping: int = 0, held_s: float = 0.0) -> None:
        """Report the totals now, if reporting was agreed; after a PONG, with that PING's value and
        how long it was held here (incoming thread)."""
        report = self.report
        if report is None:
            return
        now = time.monotonic() if now is None else now
        self._last_report = now
        report(*self.totals(now), ping, int(held_s * 1e6))

    def read_into(self, mv: Any) -> int:
        """(incoming thread)"""
        plain = self._socket
        n = (plain.try_read_into(mv) or 0) if plain is not None else 0
        if n <= 0:  # empty (or EOF, or not a plain socket): the channel's own blocking read decides
            t0 = time.monotonic()
            n = self.inner.read_into(mv)
            now = time.monotonic()
            if plain is not None:
                self.wait_s += now - t0
        else:
            now = time.monotonic()
        self.bytes_read += n
        self.last_read_at = now
        if self.report is not None and now - self._last_report >= INTERVAL:
            self.send_report(now)
        return n
