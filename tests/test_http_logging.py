"""Logging setup (migd/logsetup.py): journald format under systemd, timestamps on a terminal, and the
structured migration lines. Kept with the HTTP tests: both are what operators and monitoring see."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import subprocess
import sys

from migd.events import EventSink
from migd.logsetup import JournalFormatter, MigrationLog, migration_line, setup_logging

SCRIPT = ("import logging; from migd.logsetup import setup_logging; setup_logging('INFO'); "
          "log = logging.getLogger('migd.test'); log.info('hello\\nsecond line'); log.warning('careful'); "
          "log.debug('hidden')")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_stderr_file(tmp_path, journal_value):
    path = tmp_path / "stderr.log"
    with open(path, "wb") as err:
        env = dict(os.environ, PYTHONPATH=ROOT)
        env.pop("JOURNAL_STREAM", None)
        if journal_value is not None:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = journal_value(st)
        subprocess.run([sys.executable, "-c", SCRIPT], stderr=err, env=env, check=True, timeout=60)
    return path.read_text()


def test_journal_stream_gets_priorities_and_no_timestamps(tmp_path):
    text = run_with_stderr_file(tmp_path, lambda st: f"{st.st_dev}:{st.st_ino}")
    assert text.splitlines() == ["<6>migd.test: hello", "  second line", "<4>migd.test: careful"]


def test_terminal_or_foreign_journal_stream_gets_timestamps(tmp_path):
    for value in (None, lambda st: f"{st.st_dev}:{st.st_ino + 1}", lambda st: "garbage"):
        lines = run_with_stderr_file(tmp_path, value).splitlines()
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    migd.test: hello$", lines[0]), lines
        assert "hidden" not in "".join(lines)


def test_setup_twice_replaces_its_handler():
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        setup_logging("INFO", stream=io.StringIO(), journal=True)
        second = setup_logging("DEBUG", stream=io.StringIO(), journal=True)
        ours = [h for h in root.handlers if getattr(h, "_migd", False)]
        assert ours == [second] and root.level == logging.DEBUG
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)


def test_journal_formatter_custom_level():
    record = logging.LogRecord("x", 25, __file__, 1, "between", None, None)
    assert JournalFormatter().format(record) == "<6>x: between"


ACTIVE = {"status": "active", "expected-downtime": 40, "total-time": 900,
          "ram": {"dirty-sync-count": 2, "remaining": 1024, "transferred": 2048, "mbps": 812.345}}


def test_migration_line():
    assert migration_line(ACTIVE) == ("status=active pass=2 remaining=1024 transferred=2048 mbps=812.3 "
                                      "expected_downtime_ms=40 total_time_ms=900")
    failed = migration_line({"status": "failed", "error-desc": 'Unable to write to socket: "Broken pipe"'})
    assert failed == 'status=failed error="Unable to write to socket: \\"Broken pipe\\""'
    done = migration_line({"status": "completed", "downtime": 12, "x-migd-downtime-phases": {"ram": 3.5}})
    assert done == "status=completed downtime_ms=12 phase_ram_ms=3.5"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class ScriptedMigration:
    def __init__(self) -> None:
        self.info: dict = {}

    def query(self) -> dict:
        return dict(self.info)


class DaemonParts:
    def __init__(self) -> None:
        self.events = EventSink(asyncio.get_running_loop())
        self.migration = ScriptedMigration()


async def test_migration_log_one_line_per_state_and_pass():
    daemon = DaemonParts()
    records = Records()
    logger = logging.getLogger("migd.migration.progress")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    mlog = MigrationLog(daemon, interval=30)  # only events wake it: proves the event path
    mlog.start()
    try:
        async def logged(n):
            while len(records.lines) < n:
                await asyncio.sleep(0.01)

        await asyncio.sleep(0)
        steps = [
            {"status": "setup"},
            ACTIVE,
            dict(ACTIVE, ram=dict(ACTIVE["ram"], remaining=10)),  # same status and pass: no line
            dict(ACTIVE, ram=dict(ACTIVE["ram"], **{"dirty-sync-count": 3})),
            {"status": "completed", "downtime": 9, "ram": dict(ACTIVE["ram"], **{"dirty-sync-count": 4})},
        ]
        expected = 0
        for info in steps:
            daemon.migration.info = info
            before = len(records.lines)
            daemon.events.emit("MIGRATION_PASS", {"pass": 0})
            if info is steps[2]:
                for _ in range(5):
                    await asyncio.sleep(0.01)
                assert len(records.lines) == before
                continue
            expected += 1
            await asyncio.wait_for(logged(expected), 5)
        assert [line.split()[1] for line in records.lines] == [
            "status=setup", "status=active", "status=active", "status=completed"]
        assert "pass=3" in records.lines[2] and "downtime_ms=9" in records.lines[3]
    finally:
        await mlog.close()
        logger.removeHandler(records)
