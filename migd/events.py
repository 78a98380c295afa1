"""Emitting QMP events from any thread, delivered in the order they were emitted.

Migration and machine code never import QMP: they are handed an ``EventSink`` and call ``emit``. The
sink timestamps the event where it happened and appends it to one FIFO; the event loop delivers that
FIFO to its listeners (QMP sessions, the HTTP feed). An event emitted on the loop is delivered before
``emit`` returns (so the events a QMP command causes precede its reply, as in QEMU) — but only after
every event queued earlier by another thread, so a client never sees ``cancelling`` before the
``active`` a migration thread emitted first. ``post`` queues without delivering, for callers that
hold a lock (the migration status CAS) and deliver once they let go of it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from migd.threads import LoopHandle, any_thread

Event = dict[str, Any]
HISTORY = 64  # the last few events, kept for diagnostics


def make_event(name: str, data: dict[str, Any] | None = None) -> Event:
    now = time.time()
    seconds = int(now)
    event: Event = {"event": name}
    if data is not None:
        event["data"] = data
    event["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}
    return event


class EventSink:
    """Fans events out to listeners on the event loop; ``emit`` and ``post`` work from every thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._handle: LoopHandle | None = None
        self._listeners: list[Callable[[Event], None]] = []
        self._queue: deque[Event] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._delivering = False
        self.history: deque[Event] = deque(maxlen=HISTORY)
        if loop is not None:
            self.bind(loop)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop that delivers events."""
        self._handle = LoopHandle(loop)

    @any_thread
    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    @any_thread
    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    @any_thread
    def post(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Queue an event (cheap, safe under a lock); the loop delivers it in order."""
        event = make_event(name, data)
        with self._lock:
            self._queue.append(event)
            schedule = not self._scheduled
            self._scheduled = True
        if schedule and self._handle is not None and not self._handle.call_soon(self.deliver):
            with self._lock:  # the loop is gone: nobody will ever deliver
                self._queue.clear()

    @any_thread
    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Queue an event, and deliver at once when called on the loop (after older ones)."""
        self.post(name, data)
        self.emit_queued()

    @any_thread
    def emit_queued(self) -> None:
        """On the loop: deliver what is queued now (after ``post`` under a lock). Elsewhere: nothing,
        the loop delivers it."""
        if self._handle is None or self._handle.on_loop():
            self.deliver()

    def deliver(self) -> None:
        """Deliver everything queued, oldest first (on the loop, or anywhere before a loop is bound)."""
        if self._delivering:  # a listener emitted: the outer call delivers it next, in order
            return
        self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._scheduled = False
                        return
                    event = self._queue.popleft()
                self.history.append(event)
                for listener in list(self._listeners):
                    listener(event)
        finally:
            self._delivering = False
