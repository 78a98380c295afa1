"""Refusals are one line, never a traceback: a drive image (or RAM file) another daemon holds."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Migd

pytestmark = pytest.mark.e2e


def refused(vm: Migd, needle: str) -> str:
    """The daemon exited 1 with exactly one line naming ``needle`` and no traceback; that line."""
    assert vm.wait(30) == 1
    log = vm.log()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if needle in line]
    assert len(lines) == 1, log
    assert lines[0].startswith("migd: error: "), log
    return lines[0]


def test_drive_locked_by_another_daemon_is_one_line(migd_factory, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    first = migd_factory("one", "-m", "16M", "--drive", f"file={image}")
    second = migd_factory("two", "-m", "16M", "--drive", f"file={image}", connect=False)
    line = refused(second, "lock")
    assert line == f'migd: error: Failed to get "write" lock: Is another process using the image [{image}]?'
    assert first.status() == "running"
