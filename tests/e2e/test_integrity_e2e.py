"""End to end: a migd ``file:`` save carries checksum records (docs/FORMAT.md §1.2): QEMU's own
analyze-migration.py still reads it, it restores intact, and one flipped bit makes the restore fail
with the offset and RAM block named instead of loading different RAM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_util import digests, poll, run_status, wait_status

pytestmark = pytest.mark.e2e

MB = 1 << 20
REPO = Path(__file__).resolve().parents[2]
SCRIPT = os.environ.get("MIGD_ANALYZE_MIGRATION") or str(REPO.parent / "shared" / "tools" / "analyze-migration.py")
PAGE_RECORD = 8 + 4096


def page_data_offset(data: bytes) -> int:
    """An offset inside a PAGE record's data: two records in a row with PAGE|CONTINUE headers."""
    pos = len(data) // 3
    while pos + 2 * PAGE_RECORD < len(data):
        h1 = int.from_bytes(data[pos : pos + 8], "big")
        h2 = int.from_bytes(data[pos + PAGE_RECORD : pos + PAGE_RECORD + 8], "big")
        if h1 & 0xFFF == 0x28 and h2 & 0xFFF == 0x28 and (h2 >> 12) == (h1 >> 12) + 1:
            return pos + 8 + 1234
        pos += 1
    raise AssertionError("no run of PAGE records found")


def test_file_save_is_checked_on_restore_and_readable_by_qemu(migd_factory: Callable[..., Any], tmp_path: Path) -> None:
    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=16M")
    poll(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 4 * MB, 30,
         "the guest to write 4 MB")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    state = tmp_path / "state"
    src.cmd("migrate", uri=f"file:{state}")
    wait_status(src, "completed", 60)
    saved = digests(src)
    data = state.read_bytes()
    assert b"x-migd/checksum" in data
    if os.path.isfile(SCRIPT):  # QEMU's script reads migd's checksummed file stream
        out = subprocess.run([sys.executable, SCRIPT, "-f", str(state), "-d", "state"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert any(k.startswith("x-migd/checksum") for k in json.loads(out.stdout))
    # intact: restores with equal RAM
    dst = migd_factory("dst", "-m", "64M", "-S", "--incoming", f"file:{state}")
    wait_status(dst, "completed", 60)
    assert digests(dst) == saved
    # one flipped bit in page data: refused, not restored
    bad = tmp_path / "bad"
    pos = page_data_offset(data)
    bad.write_bytes(data[:pos] + bytes([data[pos] ^ 0x04]) + data[pos + 1 :])
    dst2 = migd_factory("dst2", "-m", "64M", "--incoming", "defer")
    dst2.cmd("migrate-incoming", uri=f"file:{bad}", **{"exit-on-error": False})
    info = wait_status(dst2, "failed", 60)
    assert info["error-desc"].startswith("load of migration failed: Checksum mismatch in the migration stream "
                                         "at offset "), info
    assert "RAM block 'ram0'" in info["error-desc"], info
    assert run_status(dst2) == "inmigrate"


def test_checksums_off_writes_qemus_stream(migd_factory: Callable[..., Any], tmp_path: Path) -> None:
    """``x-migd-checksums false``: a ``file:`` save without checksum records or migd's configuration
    subsection (QEMU's stream), restored intact; a tcp migration to a migd peer still completes."""
    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=16M")
    params = {p: v for p, v in src.cmd("query-migrate-parameters").items() if p == "x-migd-checksums"}
    assert params == {"x-migd-checksums": True}
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "x-migd-checksums": False})
    assert src.cmd("query-migrate-parameters")["x-migd-checksums"] is False
    state = tmp_path / "state"
    src.cmd("migrate", uri=f"file:{state}")
    wait_status(src, "completed", 60)
    saved = digests(src)
    data = state.read_bytes()
    assert b"x-migd/checksum" not in data and b"x-migd" not in data[:4096]
    if os.path.isfile(SCRIPT):
        out = subprocess.run([sys.executable, SCRIPT, "-f", str(state), "-d", "state"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert not any(k.startswith("x-migd/") for k in json.loads(out.stdout))
    dst = migd_factory("dst", "-m", "64M", "-S", "--incoming", f"file:{state}")
    wait_status(dst, "completed", 60)
    assert digests(dst) == saved
    # to a migd peer over tcp (commit and heartbeats still negotiated, checksums not)
    src.cmd("cont")
    peer = migd_factory("peer", "-m", "64M", "-S", "--incoming", "tcp:127.0.0.1:0")  # paused: its RAM stays what it received
    port = wait_status(peer, "setup", 30)["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(src, "completed", 90)
    wait_status(peer, "completed", 90)
    assert digests(peer) == digests(src)
