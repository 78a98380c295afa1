"""Emitting QMP events from any thread.

Migration and machine code never import QMP: they are handed an ``EventSink`` and call ``emit``. The
sink timestamps the event where it happened and hands it to the event loop with
``call_soon_threadsafe`` (QEMU's bottom half) when called from another thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

Event = dict[str, Any]


def make_event(name: str, data: dict[str, Any] | None = None) -> Event:
    now = time.time()
    seconds = int(now)
    event: Event = {"event": name}
    if data is not None:
        event["data"] = data
    event["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}
    return event


class EventSink:
    """Fans events out to listeners on the event loop; callable from every thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._loop_thread: int | None = None
        self._listeners: list[Callable[[Event], None]] = []
        self.history: list[Event] = []  # bounded: the last few events, for diagnostics
        if loop is not None:
            self.bind(loop)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop; must be called from the loop's thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        event = make_event(name, data)
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._deliver(event)
        elif not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._deliver, event)
            except RuntimeError:  # loop closed between the check and the call: shutting down
                pass

    def _deliver(self, event: Event) -> None:
        self.history.append(event)
        del self.history[:-64]
        for listener in list(self._listeners):
            listener(event)
