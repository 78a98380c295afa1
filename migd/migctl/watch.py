"""Following one outgoing migration to its end: ``migctl migrate --wait`` and the demo.

Polls ``query-migrate`` (the daemon answers it from published counters, so polling is cheap and works
without the ``events`` capability) and shows it three ways: a live panel on a terminal, one plain line
per second when stdout is a file or a pipe, one JSON record per second with ``--json``. Ctrl-C and
SIGTERM (migctl turns it into SIGINT) become ``migrate_cancel``: the operator's interrupt must not
leave a migration running behind a vanished client. A migration that does not converge is named as
such; given a time limit (the demo), migctl cancels it rather than wait forever.
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
from migd.migctl.convergence import STALL_AFTER, Convergence, forecast_eta, format_duration
from migd.migctl.display import bandwidth_bytes, dirty_rate_bytes, human_bytes, progress_view
from migd.migctl.output import Output
from migd.migctl.progress import TERMINAL, Progress

POLL_INTERVAL = 0.2
CANCEL_WAIT = 30.0  # seconds to wait for a requested cancel to land before giving up waiting


class Interrupt:
    """SIGINT while waiting: the first asks for a cancel, the second gives up waiting."""

    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        """(event loop)"""
        self.count += 1
        self.event.set()


@dataclass(frozen=True)
class Limits:
    """When to stop waiting on our own: a wall-clock limit, and how long a stall is tolerated."""

    stall_warn: float = STALL_AFTER  # seconds without a new low of remaining before the warning
    time_limit: float | None = None  # cancel after this many seconds
    stall_cancel: float | None = None  # cancel after this many seconds without a new low


NO_LIMITS = Limits()


def progress_record(info: dict[str, Any], percent: float, elapsed: float | None = None,
                    eta: float | None = None, converging: bool = True) -> dict[str, Any]:
    """One --json progress line: the figures of the live panel, in base units (seconds for times)."""
    ram = info.get("ram") or {}
    return {
        "progress": round(percent, 3),
        "status": info.get("status", "none"),
        "elapsed": None if elapsed is None else round(elapsed, 3),
        "eta": None if eta is None else round(eta, 3),
        "converging": converging,
        "transferred": ram.get("transferred"),
        "remaining": ram.get("remaining"),
        "total": ram.get("total"),
        "bandwidth": bandwidth_bytes(info),
        "dirty-rate": dirty_rate_bytes(info),
        "pass": ram.get("dirty-sync-count"),
        "expected-downtime": info.get("expected-downtime"),
        "cpu-throttle-percentage": info.get("cpu-throttle-percentage"),
    }


def plain_line(info: dict[str, Any], percent: float, elapsed: float, eta: float | None) -> str:
    """The progress line written once per second when stdout is not a terminal."""
    ram = info.get("ram") or {}
    bw, dirty = bandwidth_bytes(info), dirty_rate_bytes(info)
    parts = [
        f"[{elapsed:7.1f} s]", f"{info.get('status', 'none'):<10}", f"{percent:5.1f}%",
        f"transferred {human_bytes(ram.get('transferred'))}",
        f"remaining {human_bytes(ram.get('remaining'))} of {human_bytes(ram.get('total'))}",
        f"pass {ram.get('dirty-sync-count', '-')}",
        f"bandwidth {'-' if bw is None else human_bytes(bw) + '/s'}",
        f"dirty {'-' if dirty is None else human_bytes(dirty) + '/s'}",
        f"ETA {format_duration(eta)}",
    ]
    return "  ".join(parts)


@dataclass
class WaitResult:
    info: dict[str, Any]  # the last query-migrate answer
    interrupted: bool  # the operator pressed Ctrl-C (or sent SIGTERM)
    expected_downtime: int | None  # the last estimate shown before the switch-over
    percents: list[float] = field(default_factory=list)  # every percent shown, in order
    gave_up: str | None = None  # why migctl cancelled on its own (time limit, no convergence)


async def wait_for_migration(client: Client, out: Output, interval: float = POLL_INTERVAL,
                             limits: Limits = NO_LIMITS) -> WaitResult:
    """Follow the migration until a terminal status, a second interrupt, or a cancel that never lands
    (event loop, main thread for the signal handler)."""
    loop = asyncio.get_running_loop()
    interrupt = Interrupt()
    installed = True
    try:
        loop.add_signal_handler(signal.SIGINT, interrupt)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread: no Ctrl-C handling
        installed = False
    progress = Progress()
    conv = Convergence(stall_after=limits.stall_warn)
    cancel_sent_at: float | None = None
    gave_up: str | None = None
    last_line = 0.0
    last_status = ""
    expected: int | None = None
    percents: list[float] = []
    terminal = out.console.is_terminal and not out.json_mode
    live = Live(console=out.console, auto_refresh=False, transient=False) if terminal else None
    try:
        with live if live is not None else nullcontext():
            while True:
                info = await client.execute("query-migrate")
                now = time.monotonic()
                percent = progress.update(info)
                percents.append(percent)
                conv.update(info, now)
                status = info.get("status", "none")
                elapsed = conv.elapsed(now)
                eta = None if status in TERMINAL else forecast_eta(info)
                warning = conv.warning(info, now)
                if status in ("active", "device", "pre-switchover") and "expected-downtime" in info:
                    expected = info["expected-downtime"]
                # migd keeps its estimate at the switch-over: better than the last poll, which a
                # short migration may not even have had
                expected = info.get("x-migd-expected-downtime", expected)
                if warning is not None and not conv.warned:
                    conv.warned = True
                    if live is None:
                        out.error(f"warning: {warning}")
                elif warning is None:
                    conv.warned = False
                due = status in TERMINAL or status != last_status or now - last_line >= 1.0
                if live is not None:
                    live.update(progress_view(info, percent, elapsed, format_duration(eta), warning), refresh=True)
                elif due and out.json_mode:
                    out.data(progress_record(info, percent, elapsed, eta, warning is None))
                    last_line = now
                elif due:
                    out.line(plain_line(info, percent, elapsed, eta))
                    last_line = now
                last_status = status
                if status in TERMINAL or interrupt.count >= 2:
                    break
                if cancel_sent_at is not None and now - cancel_sent_at > CANCEL_WAIT:
                    out.error(f"the cancel did not complete within {CANCEL_WAIT:.0f} s; stopped waiting")
                    break
                reason = _give_up_reason(limits, conv, now, info)
                if cancel_sent_at is None and (interrupt.count == 1 or reason is not None):
                    if interrupt.count:
                        out.line("interrupted: cancelling the migration (Ctrl-C again to stop waiting)")
                    else:
                        gave_up = reason
                        out.error(f"{reason}: cancelling the migration")
                    await client.execute("migrate_cancel")
                    cancel_sent_at = now
                    interrupt.event.clear()
                try:
                    await asyncio.wait_for(interrupt.event.wait(), interval)
                except TimeoutError:
                    pass
        return WaitResult(info, interrupt.count > 0, expected, percents, gave_up)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)


def _give_up_reason(limits: Limits, conv: Convergence, now: float, info: dict[str, Any]) -> str | None:
    if limits.time_limit is not None and conv.elapsed(now) >= limits.time_limit:
        text = f"the migration did not complete within the time limit of {limits.time_limit:.0f} s"
        warning = conv.warning(info, now)
        return text + (f" ({warning.split(';')[0]})" if warning else "")
    if limits.stall_cancel is not None and conv.best is not None and conv.stalled_for(now) >= limits.stall_cancel:
        warning = conv.warning(info, now) or "not converging"
        return warning.split(";")[0]
    return None
