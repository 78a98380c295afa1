"""Out of descriptors, a daemon's listeners wait instead of spinning, log little, and serve again.

The fault is real: the test lowers a running daemon's RLIMIT_NOFILE (``prlimit(2)``) to the number of
descriptors it holds, so every ``accept(2)`` fails with EMFILE while clients wait in the backlog; then
it restores the limit and checks that the waiting clients are served.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2e_util import wait_status  # noqa: E402

pytestmark = pytest.mark.e2e

WINDOW = 3.0  # seconds of exhaustion measured
MAX_CPU = 0.6  # CPU seconds the daemon may use in that window (a spinning loop uses ~WINDOW)
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, every thread


@contextmanager
def out_of_fds(pid: int) -> Iterator[None]:
    """The daemon's soft descriptor limit set to its lowest free descriptor number, so the next open
    fails. (Not to the count it holds: the kernel hands out the lowest free number and checks it
    against the limit, so with a hole below the highest descriptor the next open still succeeded.)"""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    held = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = next(n for n in range(len(held) + 1) if n not in held)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))


def measure(vm, pattern: str) -> tuple[float, int]:
    """CPU seconds used and log lines matching ``pattern`` added over WINDOW seconds."""
    lines0 = len(re.findall(pattern, vm.log()))
    cpu0 = cpu_seconds(vm.proc.pid)
    deadline = time.monotonic() + WINDOW
    while time.monotonic() < deadline:  # the measurement window itself, not a synchronisation
        assert vm.proc.poll() is None, vm.log()
        time.sleep(0.1)
    used, lines = cpu_seconds(vm.proc.pid) - cpu0, len(re.findall(pattern, vm.log())) - lines0
    print(f"{vm.name}: {used:.2f} CPU-s and {lines} log lines in {WINDOW} s out of descriptors")
    return used, lines


def test_qmp_listener_backs_off_and_recovers(migd_factory) -> None:
    vm = migd_factory("q", "-m", "16M")
    waiting = []
    with out_of_fds(vm.proc.pid):
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(vm.qmp_path))  # queued in the backlog; migd cannot accept it
            waiting.append(sock)
        used, lines = measure(vm, r"QMP accept on .* failed")
    assert used < MAX_CPU, f"{used:.2f} CPU-s in {WINDOW} s: the accept loop spins"
    assert 1 <= lines <= WINDOW + 2, f"{lines} log lines in {WINDOW} s"
    for sock in waiting:  # the limit is back: every waiting client is greeted within the back-off
        sock.settimeout(5)
        assert b'"QMP"' in sock.recv(4096)
        sock.close()
    assert vm.status() == "running"


def test_http_listener_survives_and_serves_again(migd_factory) -> None:
    vm = migd_factory("h", "-m", "16M", "--http", "127.0.0.1:0")
    found = vm.wait_for(lambda: re.search(r"http endpoint on http://[^:]+:(\d+)/", vm.log()), 10)
    port = int(found.group(1))
    with out_of_fds(vm.proc.pid):
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        for sock in clients:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        used, lines = measure(vm, r"(?i)accept")
    for sock in clients:
        sock.close()
    assert used < MAX_CPU, f"{used:.2f} CPU-s in {WINDOW} s: the accept loop spins"
    assert lines <= WINDOW + 2, f"{lines} log lines in {WINDOW} s"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                return reply.status == 200
        except OSError:
            return False

    vm.wait_for(healthy, 10, "the HTTP endpoint to answer again")


def test_incoming_listener_waits_for_fds_then_migrates(migd_factory) -> None:
    src = migd_factory("src", "-m", "16M")
    dst = migd_factory("dst", "-m", "16M", "--incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    with out_of_fds(dst.proc.pid):
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        used, lines = measure(dst, r"incoming accept failed")
        assert dst.cmd("query-status")["status"] == "inmigrate"
    assert used < MAX_CPU, f"{used:.2f} CPU-s in {WINDOW} s: the incoming accept loop spins"
    assert 1 <= lines <= WINDOW + 2, f"{lines} log lines in {WINDOW} s"
    wait_status(src, "completed", 30)
    dst.wait_for(lambda: dst.cmd("query-status")["status"] == "running", 30, "the destination to run")
