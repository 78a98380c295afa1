"""Logging for a daemon that usually runs under systemd.

journald stamps every line itself and reads a ``<N>`` syslog priority prefix from stderr, so under
systemd (``JOURNAL_STREAM`` names our stderr) lines carry that prefix and no timestamp; on a terminal
they carry a timestamp and the level name. The migration code itself logs one ``key=value`` line per
state change and per pass (``migd.migration.state``), which both people and log processors can read.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# syslog priorities (RFC 5424) of Python's levels, for journald's SyslogLevelPrefix
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

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
