"""The dashboard's feed: one sample of the migration per interval, fanned out to every open page.

Samples come from ``query-migrate`` (not from events), so the chart works whether or not the ``events``
capability is on; a MIGRATION event only makes the next sample come at once. Passes are marked where
``dirty-sync-count`` grows. Each subscriber has a bounded queue: a page that stops reading is dropped,
it never makes the daemon wait. The forwarded QMP events of the last migration are kept too (bounded),
so a page opened after the migration still lists what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from migd.http.host import HttpHost
from migd.http.metrics import api_info
from migd.units import PAGE_SIZE

log = logging.getLogger(__name__)

HISTORY = 600  # samples kept for a page that opens mid-migration
EVENT_HISTORY = 200  # forwarded QMP events kept (those of the last migration, from its setup on)
QUEUE = 256
FORWARDED_EVENTS = frozenset({"MIGRATION", "MIGRATION_PASS", "STOP", "RESUME", "SHUTDOWN"})


def make_sample(info: dict[str, Any], runstate: str, now: float,
                downtime_limit: int | None = None) -> dict[str, Any]:
    """The figures the dashboard charts, in base units (bytes, bytes/s, milliseconds as QEMU gives them);
    ``downtime_limit`` is the ``downtime-limit`` parameter (ms)."""
    ram = info.get("ram") or {}
    incoming = info.get("x-migd-incoming") or {}
    page = ram.get("page-size", PAGE_SIZE)
    rate = ram.get("dirty-pages-rate")
    mbps = ram.get("mbps")
    return {
        "t": round(now, 3),
        "status": info.get("status", "none"),
        "runstate": runstate,
        "remaining": ram.get("remaining"),
        "total": ram.get("total"),
        "transferred": ram.get("transferred"),
        "bandwidth": None if mbps is None else mbps * 1e6 / 8,
        "dirty_rate": None if rate is None else rate * page,
        "expected_downtime": info.get("expected-downtime"),
        "downtime": info.get("downtime"),
        "pass": ram.get("dirty-sync-count"),
        "throttle": info.get("cpu-throttle-percentage"),
        "phases": info.get("x-migd-downtime-phases"),
        "error": info.get("error-desc"),
        "downtime_limit": downtime_limit,
        "convergence": info.get("x-migd-convergence"),
        "received": incoming.get("received"),
    }


class LiveFeed:
    """Samples the daemon every ``interval`` seconds and publishes (kind, data) to subscribers."""

    def __init__(self, daemon: HttpHost, interval: float = 1.0) -> None:
        self.daemon = daemon
        self.interval = interval
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        self._subscribers: set[asyncio.Queue[tuple[str, Any] | None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.daemon.events.subscribe(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="http-live-feed")

    async def close(self) -> None:
        self.daemon.events.unsubscribe(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in list(self._subscribers):
            self._offer(queue, None)  # tells the page's stream to end
        self._subscribers.clear()

    def subscribe(self) -> asyncio.Queue[tuple[str, Any] | None]:
        queue: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue(maxsize=QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, Any] | None]) -> None:
        self._subscribers.discard(queue)

    def sample_now(self) -> dict[str, Any]:
        """(event loop) One sample, kept and published."""
        limit = self.daemon.migration_config.param("downtime-limit")
        sample = make_sample(api_info(self.daemon), str(self.daemon.runstate.state), time.time(),
                             int(limit) if isinstance(limit, int | float) else None)
        self.history.append(sample)
        self._publish("sample", sample)
        return sample

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") in FORWARDED_EVENTS:
            if event.get("event") == "MIGRATION" and (event.get("data") or {}).get("status") == "setup":
                self.events.clear()  # a new migration: the list is about it from now on
            self.events.append(event)
            self._publish("qmp", event)
            self._wake.set()

    def _publish(self, kind: str, data: Any) -> None:
        for queue in list(self._subscribers):
            if not self._offer(queue, (kind, data)):
                self._subscribers.discard(queue)  # too slow: its stream ends, the page reconnects

    @staticmethod
    def _offer(queue: asyncio.Queue[tuple[str, Any] | None], item: tuple[str, Any] | None) -> bool:
        try:
            queue.put_nowait(item)
            return True
        except asyncio.QueueFull:
            return False

    def subscribed(self, queue: asyncio.Queue[tuple[str, Any] | None]) -> bool:
        return queue in self._subscribers

    async def _run(self) -> None:
        while True:
            try:
                self.sample_now()
            except Exception:  # a broken sample must not end the feed (or the daemon); say why
                log.exception("dashboard sample failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
