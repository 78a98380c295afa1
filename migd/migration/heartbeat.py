"""[migd] Stalled peers noticed: heartbeats and silence timeouts between two migd peers.

A migration whose peer stopped (SIGSTOP, a dead host, a cut link that TCP has not noticed yet) used to
sit in ``active`` forever. Between migd peers that negotiated it (docs/SWITCHOVER.md §2), each side
sends a heartbeat at least once a second while it has nothing else to say, and gives up on a peer it
has not heard from for ``x-migd-peer-timeout`` seconds.

- ``Watchdog``: one thread per migration and side; every tick it sends a heartbeat when due and checks
  the peer's silence. It never decides anything itself: the owner's ``on_silence`` does.
- ``IdleStream`` (source): the stream carries sections that must not be cut, so the source's heartbeat
  (a COMMAND) goes out only while the migration thread declared the stream idle (``with idle():`` —
  waiting for ``migrate-continue``, for LOADED, for the final SHUT, flushing drives).
- ``WatchedChannel`` (destination): a channel that notes when it last received a byte, and whether
  it ended with a clean EOF (the source closed it) or an error.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from migd.migration.stream import OutStream, StreamError
from migd.transports.channel import Channel, ChannelFilter

log = logging.getLogger("migd.migration")

MAX_INTERVAL = 1.0  # seconds: a heartbeat at least this often
MIN_INTERVAL = 0.05
TICK = 0.1  # seconds between the watchdog's checks


def beat_interval(peer_timeout_ms: int) -> float:
    """How often to send, given the *peer's* timeout: at most 1 s, and four beats per timeout."""
    if peer_timeout_ms <= 0:
        return MAX_INTERVAL
    return max(MIN_INTERVAL, min(MAX_INTERVAL, peer_timeout_ms / 1000 / 4))


def writable(channel: Channel) -> bool:
    """Whether a few bytes can be written without blocking: a heartbeat never waits on a full socket
    (the watchdog thread must stay free to notice the silence)."""
    try:
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLOUT)
        return bool(poller.poll(0))
    except (OSError, ValueError, NotImplementedError):
        return False


class Watchdog:
    """Sends ``send()`` every ``interval()`` s and calls ``on_silence(seconds)`` once the peer was silent
    longer than ``timeout`` s (``silent_for()`` returns None while silence is not watched yet)."""

    def __init__(self, name: str, timeout: float, send: Callable[[], None],
                 interval: Callable[[], float | None], silent_for: Callable[[], float | None],
                 on_silence: Callable[[float], None]) -> None:
        self.timeout = timeout
        self._send = send
        self._interval = interval
        self._silent_for = silent_for
        self._on_silence = on_silence
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.fired = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """(any thread) Ends the thread; never waits on a heartbeat that is blocked in a write."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)

    def _run(self) -> None:
        """(watchdog thread)"""
        last_sent = time.monotonic()
        while not self._stop.wait(TICK):
            now = time.monotonic()
            interval = self._interval()
            if interval is not None and now - last_sent >= interval:
                last_sent = now
                try:
                    self._send()
                except (OSError, StreamError) as exc:  # the owner notices a broken channel itself
                    log.debug("heartbeat not sent: %s", exc)
            silent = self._silent_for()
            if silent is not None and silent > self.timeout and not self.fired:
                self.fired = True
                self._on_silence(silent)
                return


class IdleStream:
    """Source: lets the watchdog put a COMMAND into the stream only between sections, while the migration
    thread waits inside ``idle()``."""

    def __init__(self, stream: OutStream, data: bytes) -> None:
        self.stream = stream
        self.data = data
        self._lock = threading.Lock()
        self._idle = False
        self.sent = 0

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """(migration thread) The stream is at a section boundary and untouched inside this block."""
        with self._lock:
            self._idle = True
        try:
            yield
        finally:
            with self._lock:  # waits for a heartbeat being written right now
                self._idle = False

    def beat(self) -> None:
        """(watchdog thread) One heartbeat, if the stream is idle and healthy."""
        with self._lock:
            if not self._idle or self.stream.error is not None or not writable(self.stream.channel):
                return
            self.stream.put(self.data)
            self.stream.flush()
            self.sent += 1


class WatchedChannel(ChannelFilter):
    """Destination: a channel that remembers when it last received data and how it ended."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(inner)
        self.last_heard = time.monotonic()
        self.eof = False  # read returned 0: the peer closed its side cleanly
        self.read_error: str | None = None

    def silent_for(self) -> float:
        return max(0.0, time.monotonic() - self.last_heard)

    def read_into(self, mv: Any) -> int:
        try:
            n = self.inner.read_into(mv)
        except OSError as exc:
            self.read_error = exc.strerror or str(exc)
            raise
        if n:
            self.last_heard = time.monotonic()
        else:
            self.eof = True
        return n
