"""A daemon-wide budget for unfinished QMP input: many clients with huge strings cannot add up.

Four real clients each push a 48 MiB unfinished string (the per-connection 64 MiB bound allows each);
together they would hold 192 MiB. The daemon keeps the total under its 128 MiB budget: the client that
pushes past it gets QEMU's "JSON token size limit exceeded", and every session stays usable.
"""

from __future__ import annotations

import array
import fcntl
import termios
import threading
from pathlib import Path

import pytest
from helpers import RawQMP, wait_for

from migd.qmp.budget import MAX_INPUT_TOTAL, InputBudget

STRING = 48 << 20
CLIENTS = 4


def test_budget_counts_every_session_together() -> None:
    budget = InputBudget(100)
    assert budget.update(1, 60)
    assert budget.update(2, 40)
    assert not budget.update(3, 1)
    assert budget.update(3, 0)
    budget.release(1)
    assert budget.used == 40
    assert budget.update(2, 100)


def unread(raw: RawQMP) -> int:
    """Bytes this client sent that the daemon has not read yet (TIOCOUTQ on a unix socket)."""
    buf = array.array("i", [0])
    fcntl.ioctl(raw.sock.fileno(), termios.TIOCOUTQ, buf)
    return buf[0]


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


@pytest.mark.e2e
def test_clients_together_stay_within_the_budget(migd_factory) -> None:
    vm = migd_factory("bud", "-m", "16M")
    before = peak_rss(vm.proc.pid)
    clients = [RawQMP(vm.qmp_path, timeout=60) for _ in range(CLIENTS)]
    for raw in clients:
        raw.negotiate()
    chunk = b"a" * (1 << 20)

    def push(raw: RawQMP) -> None:
        raw.send(b'{"execute": "x", "arguments": {"s": "')
        for _ in range(STRING >> 20):
            raw.send(chunk)

    threads = [threading.Thread(target=push, args=(raw,)) for raw in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive()
    wait_for(lambda: all(unread(raw) == 0 for raw in clients), 60, what="the daemon to read every byte")
    grown = peak_rss(vm.proc.pid) - before  # while the strings are unfinished (their end parses them)
    print(f"peak RSS growth with {CLIENTS} x {STRING >> 20} MiB unfinished: {grown >> 20} MiB")
    assert grown < MAX_INPUT_TOTAL + (24 << 20), f"peak RSS grew {grown >> 20} MiB"
    outcomes = []
    for i, raw in enumerate(clients):
        raw.send(b'"}}')
        raw.send({"execute": "query-name", "id": i})
        seen = []
        while True:
            msg = raw.reply()
            if msg.get("id") == i:
                assert msg == {"return": {"name": "bud"}, "id": i}
                break
            seen.append(msg["error"]["desc"])
        outcomes.append(seen)
        raw.close()
    limited = [seen for seen in outcomes if "JSON token size limit exceeded" in seen]
    finished = [seen for seen in outcomes if "The command x has not been found" in seen]
    assert limited, outcomes
    assert finished, outcomes  # the budget drops the one over it, not everyone
    assert vm.cmd("query-status")["status"] == "running"
