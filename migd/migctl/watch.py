"""Following one outgoing migration to its end: ``migctl migrate --wait`` and the demo.

Polls ``query-migrate`` (the daemon answers it from published counters, so polling is cheap and works
without the ``events`` capability), draws the live panel, and turns Ctrl-C into ``migrate_cancel``: the
operator's interrupt must not leave a migration running behind a vanished client.
"""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from rich.live import Live

from migd.migctl.client import Client
from migd.migctl.display import bandwidth_bytes, dirty_rate_bytes, progress_view
from migd.migctl.output import Output
from migd.migctl.progress import TERMINAL, Progress

POLL_INTERVAL = 0.2


class Interrupt:
    """SIGINT while waiting: the first asks for a cancel, the second gives up waiting."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()


def progress_record(info: dict[str, Any], percent: float) -> dict[str, Any]:
    """One --json progress line: the figures of the live panel, in base units."""
    ram = info.get("ram") or {}
    return {
        "progress": round(percent, 3),
        "status": info.get("status", "none"),
        "transferred": ram.get("transferred"),
        "remaining": ram.get("remaining"),
        "total": ram.get("total"),
        "bandwidth": bandwidth_bytes(info),
        "dirty-rate": dirty_rate_bytes(info),
        "pass": ram.get("dirty-sync-count"),
        "expected-downtime": info.get("expected-downtime"),
        "cpu-throttle-percentage": info.get("cpu-throttle-percentage"),
    }


@dataclass
class WaitResult:
    info: dict[str, Any]  # the last query-migrate answer
    interrupted: bool  # the operator pressed Ctrl-C
    expected_downtime: int | None  # the last estimate shown before the switch-over
    percents: list[float] = field(default_factory=list)  # every percent shown, in order


async def wait_for_migration(client: Client, out: Output, interval: float = POLL_INTERVAL) -> WaitResult:
    """Follow the migration until a terminal status (or a second Ctrl-C)."""
    loop = asyncio.get_running_loop()
    interrupt = Interrupt()
    installed = True
    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: no Ctrl-C handling
        installed = False
    progress = Progress()
    cancel_sent = False
    last_json = 0.0
    last_status = ""
    expected: int | None = None
    percents: list[float] = []
    live = Live(console=out.console, auto_refresh=False, transient=False) if not out.json_mode else None
    try:
        with live if live is not None else nullcontext():
            while True:
                info = await client.execute("query-migrate")
                percent = progress.update(info)
                percents.append(percent)
                status = info.get("status", "none")
                if status in ("active", "device", "pre-switchover") and "expected-downtime" in info:
                    expected = info["expected-downtime"]
                # migd keeps its estimate at the switch-over: better than the last poll, which a
                # short migration may not even have had
                expected = info.get("x-migd-expected-downtime", expected)
                if live is not None:
                    live.update(progress_view(info, percent), refresh=True)
                elif status in TERMINAL or status != last_status or time.monotonic() - last_json >= 1.0:
                    out.data(progress_record(info, percent))
                    last_json = time.monotonic()
                last_status = status
                if status in TERMINAL or interrupt.count >= 2:
                    return WaitResult(info, interrupt.count > 0, expected, percents)
                if interrupt.count == 1 and not cancel_sent:
                    out.line("interrupted: cancelling the migration (Ctrl-C again to stop waiting)")
                    await client.execute("migrate_cancel")
                    cancel_sent = True
                    interrupt.event.clear()
                try:
                    await asyncio.wait_for(interrupt.event.wait(), interval)
                except TimeoutError:
                    pass
    finally:
        if live is not None and not out.console.is_terminal:
            out.console.line()  # rich ends a non-terminal Live without a newline
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
