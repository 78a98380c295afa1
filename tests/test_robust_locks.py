"""Refusals are one line, never a traceback; a RAM file (``--mem-path``) is locked like a drive image.

Two daemons in one RAM file corrupt each other's guest, so the file is locked (flock) while its guest
runs there: exclusively, unless every user asks for ``share=on``. Like a drive's lock it is released
at the switch-over and taken back when a migration fails after it.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

import pytest
from helpers import Migd, settled

from migd.startup import EXIT_CONFIG, EXIT_RUNTIME

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2e_util import wait_status  # noqa: E402

pytestmark = pytest.mark.e2e


def refused(vm: Migd, needle: str, status: int = EXIT_RUNTIME) -> str:
    """The daemon exited with ``status`` (migd/startup.py: 3 for a lock held elsewhere, 2 for bad
    configuration) and exactly one line naming ``needle`` and no traceback; that line."""
    assert vm.wait(30) == status
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
    assert line == f'migd: error: --drive: Failed to get "write" lock: Is another process using the image [{image}]?'
    assert first.status() == "running"


def held_elsewhere(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` (probed with our own exclusive flock)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock if it got one
    return False


def ram_lock(vm: Migd) -> bool:
    (block,) = vm.cmd("x-migd-query-machine")["ram"]["blocks"]
    return bool(block["locked"])


def counter_consistent(vm: Migd) -> bool:
    """The counter guest ran on and its RAM agrees with it (checked paused, as the workload tests do)."""
    vm.wait_for(lambda: vm.cmd("x-migd-query-workload")["vcpus"][0].get("counter", 0) > 10, 30, "counting")
    vm.cmd("stop")
    work = vm.cmd("x-migd-query-workload")["vcpus"][0]
    return work["consistent"] is True and work["ram-counter"] == work["counter"]


def test_second_daemon_on_the_same_mem_path_is_refused(migd_factory, tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    first = migd_factory("one", "-m", "16M", "--mem-path", str(ram), "--workload", "counter,rate=1M")
    second = migd_factory("two", "-m", "16M", "--mem-path", str(ram), connect=False)
    line = refused(second, "--mem-path")
    assert line == (f'migd: error: --mem-path {ram}: Failed to get "write" lock: Is another process using '
                    "the file? (--mem-path FILE,share=on shares it on purpose)")
    # asking to share does not override another daemon's exclusive use either
    third = migd_factory("three", "-m", "16M", "--mem-path", f"{ram},share=on", connect=False)
    refused(third, "--mem-path")
    assert first.status() == "running" and ram_lock(first)
    assert counter_consistent(first)


def test_shared_use_only_when_both_ask(migd_factory, tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    one = migd_factory("one", "-m", "16M", "--mem-path", f"{ram},share=on")
    two = migd_factory("two", "-m", "16M", "--mem-path", f"{ram},share=on")
    assert ram_lock(one) and ram_lock(two)
    alone = migd_factory("alone", "-m", "16M", "--mem-path", str(ram), connect=False)
    refused(alone, "--mem-path")


def test_mem_path_lock_follows_the_migration(migd_factory, tmp_path: Path) -> None:
    """Released by the source at switch-over, kept by the destination; a new daemon may then use it."""
    src_ram, dst_ram = tmp_path / "src.ram", tmp_path / "dst.ram"
    src = migd_factory("src", "-m", "32M", "--mem-path", str(src_ram), "--workload", "counter,rate=1M")
    dst = migd_factory("dst", "-m", "32M", "--mem-path", str(dst_ram), "--incoming", "defer")
    assert held_elsewhere(src_ram) and held_elsewhere(dst_ram)  # the destination's load writes its file
    sock = f"unix:{src.sock_path('mig')}"
    dst.cmd("migrate-incoming", uri=sock)
    src.cmd("migrate", uri=sock)
    wait_status(src, "completed", 60)
    wait_status(dst, "completed", 60)
    assert not ram_lock(src) and not held_elsewhere(src_ram)
    assert ram_lock(dst) and held_elsewhere(dst_ram)
    assert counter_consistent(dst)
    again = migd_factory("again", "-m", "32M", "--mem-path", str(src_ram))  # the file is free now
    assert again.status() == "running"


def test_failed_switchover_gives_the_source_its_mem_path_lock_back(migd_factory, tmp_path: Path) -> None:
    """The destination refuses the device state after the source unlocked: the source locks again."""
    src_ram = tmp_path / "src.ram"
    src = migd_factory("src", "-m", "32M", "--smp", "1", "--mem-path", str(src_ram))
    dst = migd_factory("dst", "-m", "32M", "--smp", "2", "--incoming", "defer")
    sock = f"unix:{src.sock_path('mig')}"
    dst.cmd("migrate-incoming", uri=sock, exit_on_error=False)
    src.cmd("migrate", uri=sock)
    wait_status(dst, "failed", 60)
    info = wait_status(src, "failed", 60)
    assert info["error-desc"] == "Sibling indicated error 1"
    settled(src, "running")  # switched over when the SHUT came: the resume follows the status
    assert ram_lock(src) and held_elsewhere(src_ram)


@pytest.mark.parametrize(("args", "line"), [
    (["--mem-path", "/nonexistent/ram"], "migd: error: --mem-path /nonexistent/ram: No such file or directory"),
    (["--mem-path", "{tmp}"], "migd: error: --mem-path {tmp}: Is a directory"),
    (["--qmp", "unix:/nonexistent/q.sock"],
     "migd: error: --qmp unix:/nonexistent/q.sock: No such file or directory"),
    (["--drive", "file=/nonexistent"],
     "migd: error: --drive: Could not open '/nonexistent': No such file or directory"),
])
def test_start_up_refusals_are_one_line_naming_the_option(migd_factory, tmp_path: Path, args, line) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    vm = migd_factory("bad", "-m", "16M", *args, connect=False)
    assert refused(vm, "error", EXIT_CONFIG) == line.format(tmp=tmp_path)
