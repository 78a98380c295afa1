"""Start-up failures: one line naming the option and the cause, never a traceback; exit 2 for bad
configuration, 3 for runtime failures; no daemon without QMP; a live QMP socket is never taken over, a
stale one is; the socket path appears only once it accepts connections."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run_migd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migd", "-m", "16M", *args], capture_output=True, text=True,
                          timeout=60, env=ENV, cwd=REPO)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed start (anything more, a traceback, is a defect)."""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr.rstrip("\n")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_no_qmp_endpoint_is_refused() -> None:
    proc = run_migd()
    assert proc.returncode == 2
    assert one_line(proc) == "migd: error: --qmp: no QMP endpoint given (unix:PATH or tcp:HOST:PORT)"


@pytest.mark.parametrize(("args", "line"), [
    (["--qmp", "unix:/nonexistent-dir/x.sock"], "--qmp unix:/nonexistent-dir/x.sock: No such file or directory"),
    (["--drive", "file=/nonexistent-dir/d.img"],
     "--drive: Could not open '/nonexistent-dir/d.img': No such file or directory"),
    (["--mem-path", "/nonexistent-dir/ram"], "--mem-path /nonexistent-dir/ram: No such file or directory"),
    (["--incoming", "bogus:x"], "--incoming bogus:x: unknown migration protocol: bogus:x"),
])
def test_bad_configuration_exits_2(args: list[str], line: str, tmp_path: Path) -> None:
    qmp = [] if args[0] == "--qmp" else ["--qmp", f"unix:{tmp_path}/q.sock"]
    proc = run_migd(*qmp, *args)
    assert proc.returncode == 2
    assert one_line(proc) == f"migd: error: {line}"


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "q.sock"
    path.write_text("precious")
    proc = run_migd("--qmp", f"unix:{path}")
    assert proc.returncode == 2
    assert one_line(proc) == f"migd: error: --qmp unix:{path}: the path exists and is not a socket"
    assert path.read_text() == "precious"


def test_addresses_in_use_exit_3(busy_port: int, tmp_path: Path) -> None:
    addr = f"127.0.0.1:{busy_port}"
    for args, option in ((["--qmp", f"tcp:{addr}"], f"--qmp tcp:{addr}"),
                         (["--http", addr], f"--http {addr}"),
                         (["--incoming", f"tcp:{addr}"], f"--incoming tcp:{addr}")):
        qmp = [] if args[0] == "--qmp" else ["--qmp", f"unix:{tmp_path}/q.sock"]
        proc = run_migd(*qmp, *args)
        assert proc.returncode == 3, proc.stderr
        line = one_line(proc)
        assert line.startswith(f"migd: error: {option}: ") and line.endswith("Address already in use"), line


@pytest.mark.skipif(Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="the kernel grants any mapping (overcommit_memory=1)")
def test_more_memory_than_the_host_has_exits_3(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "migd", "-m", "64T", "--qmp", f"unix:{tmp_path}/q.sock"],
                          capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 3
    line = one_line(proc)
    assert line.startswith("migd: error: -m 64T: ") and line.endswith(": Cannot allocate memory"), line
    assert "70368744177664 bytes of guest RAM" in line  # what it tried to allocate


def test_a_live_socket_is_never_taken_over(migd_factory) -> None:
    vm = migd_factory("first", "-m", "16M")
    proc = run_migd("--qmp", f"unix:{vm.qmp_path}")
    assert proc.returncode == 3
    assert one_line(proc) == (f"migd: error: --qmp unix:{vm.qmp_path}: Address already in use "
                              "(another process serves this socket)")
    assert vm.cmd("query-status")["running"] is True  # the first daemon keeps its socket
    assert vm.client().cmd("query-status")["running"] is True  # and new clients still reach it


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a killed daemon leaves behind
    proc = subprocess.Popen([sys.executable, "-m", "migd", "-m", "16M", "--qmp", f"unix:{path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        def greets() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with socket.socket(socket.AF_UNIX) as c:
                try:
                    c.connect(str(path))
                except ConnectionRefusedError:
                    return False
                return c.recv(4096).startswith(b'{"QMP"')
        wait_for(greets, timeout=30, what="the daemon on the formerly stale socket")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_the_socket_path_appears_only_once_it_accepts(tmp_path: Path) -> None:
    """Connect the instant the path exists: never ECONNREFUSED; no temporary name left behind."""
    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    os.truncate(ram, 64 << 20)
    path = tmp_path / "q.sock"
    proc = subprocess.Popen([sys.executable, "-m", "migd", "-m", "64M", "--mem-path", str(ram), "--qmp",
                             f"unix:{path}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 30
        while not path.exists():  # a tight poll: catch the very first moment the path is there
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.0005)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))  # ConnectionRefusedError here is the defect
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q.sock", "ram"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
