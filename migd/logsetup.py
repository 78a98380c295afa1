"""Logging for a daemon that usually runs under systemd.

journald stamps every line itself and reads a ``<N>`` syslog priority prefix from stderr, so under
systemd (``JOURNAL_STREAM`` names our stderr) lines carry that prefix and no timestamp; on a terminal
they carry a timestamp and the level name. Migration progress is logged as one ``key=value`` line per
state change and per pass, which both people and log processors can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any, TextIO

# syslog priorities (RFC 5424) of Python's levels, for journald's SyslogLevelPrefix
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

MIGRATION_LOGGER = "migd.migration.progress"


def journal_stream_is(stream: TextIO) -> bool:
    """True when $JOURNAL_STREAM is the device:inode of ``stream`` (systemd's documented check)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no real file behind the stream (e.g. under pytest)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class JournalFormatter(logging.Formatter):
    """``<6>migd.qmp: message`` — priority for journald, no timestamp (journald adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = PRIORITIES.get(record.levelno)
        if prio is None:  # custom levels: the nearest standard one below
            prio = next((p for lvl, p in sorted(PRIORITIES.items(), reverse=True) if record.levelno >= lvl), 7)
        text = super().format(record)
        # journald would split a multi-line message into separate entries; keep one entry per record
        return f"<{prio}>" + text.replace("\n", "\n  ")


def console_formatter() -> logging.Formatter:
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def setup_logging(level: int | str = logging.INFO, stream: TextIO | None = None,
                  journal: bool | None = None) -> logging.Handler:
    """Configure the root logger once for the daemon; returns the handler it installed.

    ``journal`` forces the format; by default it is detected from ``$JOURNAL_STREAM``.
    """
    stream = stream if stream is not None else sys.stderr
    if journal is None:
        journal = journal_stream_is(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else console_formatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_migd", False)]:
        root.removeHandler(old)
    handler._migd = True  # type: ignore[attr-defined]  # ours: replaced, not stacked, on a second call
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # the QMP client library and aiohttp's access log are chatty at INFO; keep them to warnings
    for noisy in ("qemu.qmp", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def migration_line(info: dict[str, Any]) -> str:
    """``status=active pass=2 remaining=... mbps=... expected_downtime_ms=...`` from a query-migrate answer."""
    ram = info.get("ram") or {}
    fields: list[tuple[str, Any]] = [("status", info.get("status", "none"))]
    if ram:
        fields += [("pass", ram.get("dirty-sync-count")), ("remaining", ram.get("remaining")),
                   ("transferred", ram.get("transferred")), ("mbps", round(float(ram.get("mbps", 0.0)), 1))]
    for key, name in (("expected-downtime", "expected_downtime_ms"), ("downtime", "downtime_ms"),
                      ("total-time", "total_time_ms"), ("cpu-throttle-percentage", "throttle_pct")):
        if key in info:
            fields.append((name, info[key]))
    for phase, ms in (info.get("x-migd-downtime-phases") or {}).items():
        fields.append((f"phase_{phase}_ms", ms))
    if "error-desc" in info:
        fields.append(("error", info["error-desc"]))
    return " ".join(f"{k}={_logfmt(v)}" for k, v in fields if v is not None)


def _logfmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class MigrationLog:
    """Logs one INFO line per migration status change and per pass, from the daemon's query-migrate.

    Works from the published counters, so it needs neither the ``events`` capability nor a hook in the
    migration thread: a MIGRATION/MIGRATION_PASS event (when enabled) only makes it look at once.
    """

    def __init__(self, daemon: Any, interval: float = 0.1) -> None:
        self.daemon = daemon
        self.interval = interval
        self.log = logging.getLogger(MIGRATION_LOGGER)
        self._last: tuple[str, Any] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def observe(self, info: dict[str, Any]) -> bool:
        """Log ``info`` if its status or pass differs from the last logged; returns whether it logged."""
        key = (info.get("status", "none"), (info.get("ram") or {}).get("dirty-sync-count"))
        if key == self._last or (self._last is None and key[0] == "none"):
            return False
        self._last = key
        level = logging.WARNING if key[0] == "failed" else logging.INFO
        self.log.log(level, "migration %s", migration_line(info))
        return True

    def start(self) -> None:
        self.daemon.events.subscribe(self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="migration-log")

    async def close(self) -> None:
        self.daemon.events.unsubscribe(self._on_event)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("MIGRATION", "MIGRATION_PASS"):
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                self.observe(self.daemon.migration.query())
            except Exception:  # logging must never take the daemon down
                self.log.exception("could not read the migration state")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)


def start_migration_log(daemon: Any, interval: float = 0.1) -> MigrationLog:
    """Start logging the daemon's migrations (call on the running loop); ``await close()`` to stop."""
    mlog = MigrationLog(daemon, interval)
    mlog.start()
    return mlog
