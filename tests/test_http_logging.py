"""Logging setup (migd/logsetup.py): journald format under systemd, timestamps on a terminal, and the
structured migration lines. Kept with the HTTP tests: both are what operators and monitoring see."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

from migd.logsetup import JournalFormatter, setup_logging

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

