"""End to end: convergence and downtime you can plan on (issue 10), with real migd processes.

A capped link switches over at the rate of the uncapped final pass; a guest that outruns its link is
reported ``diverging`` (query-migrate and an event); the built-in policy acts and says so; a round trip
of 100 ms (a delaying relay of the test's own between the two daemons) no longer stalls anything.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from e2e_util import digests, poll, query, wait_status

pytestmark = pytest.mark.e2e

MIB = 1 << 20


class DelayRelay:
    """A unix-socket relay that holds every chunk ``delay`` seconds in each direction (the latency of
    a long link; this kernel has no netem). Threads end when either side closes."""

    def __init__(self, listen: Path, target: Path, delay: float) -> None:
        self.delay = delay
        self.target = target
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(listen))
        self.server.listen(1)
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self._closed = threading.Event()
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self.threads.append(accept)

    def _accept(self) -> None:
        try:
            a, _ = self.server.accept()
        except OSError:
            return
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.connect(str(self.target))
        self.socks += [a, b]
        for src, dst in ((a, b), (b, a)):
            queue: deque[tuple[float, bytes]] = deque()
            cond = threading.Condition()
            for fn in (self._reader, self._writer):
                t = threading.Thread(target=fn, args=(src, dst, queue, cond), daemon=True)
                t.start()
                self.threads.append(t)

    def _reader(self, src: socket.socket, dst: socket.socket, queue: deque[tuple[float, bytes]],
                cond: threading.Condition) -> None:
        while not self._closed.is_set():
            try:
                data = src.recv(1 << 20)
            except OSError:
                data = b""
            with cond:
                queue.append((time.monotonic() + self.delay, data))
                cond.notify()
            if not data:
                return

    def _writer(self, src: socket.socket, dst: socket.socket, queue: deque[tuple[float, bytes]],
                cond: threading.Condition) -> None:
        while not self._closed.is_set():
            with cond:
                cond.wait_for(lambda: bool(queue) or self._closed.is_set(), 1.0)
                if not queue:
                    continue
                due, data = queue[0]
                left = due - time.monotonic()
                if left > 0:
                    cond.wait(left)  # the delay itself, not a synchronisation
                    continue
                queue.popleft()
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        for s in (self.server, *self.socks):
            try:
                s.close()
            except OSError:
                pass


def _pair(migd_factory, memory: str, workload: str, tmp: Path, delay: float = 0.0):
    src = migd_factory("src", "-m", memory, "--workload", workload)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    dst = migd_factory("dst", "-m", memory, "-S", "--incoming", f"unix:{tmp}/dst.sock")
    wait_status(dst, "setup", 30)
    relay = DelayRelay(tmp / "mig.sock", tmp / "dst.sock", delay) if delay else None
    uri = f"unix:{tmp}/mig.sock" if relay else f"unix:{tmp}/dst.sock"
    return src, dst, relay, uri


@pytest.fixture
def short_tmp():
    with tempfile.TemporaryDirectory(prefix="migd-conv-") as d:  # sockaddr_un paths are short
        yield Path(d)


def test_capped_link_converges_at_the_uncapped_final_rate(migd_factory, short_tmp: Path) -> None:
    """Issue 10: random,rate=32M at max-bandwidth 32 MiB/s, 512 MiB, took 84 s and 2.7 GB.

    Here the guest rewrites a 32 MiB working set at 32 MB/s behind a 16 MiB/s cap: a threshold at the
    capped rate (4.8 MiB in 300 ms) is never reached, the uncapped final pass carries the whole set in
    a fraction of the limit. The set bounds what the final pass carries, so the downtime stays far
    below the limit however slow the host is (the whole of RAM dirty gave 421 ms under a CPU hog).
    The forecast is looked at while a 1 ms limit holds the migration active; then the limit is 300.
    """
    src, dst, _, uri = _pair(migd_factory, "512M", "random,rate=32M,wss=32M", short_tmp)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 * MIB, "downtime-limit": 1})
    poll(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 8 * MIB, 30,
         "the guest to write 8 MiB")
    src.cmd("migrate", uri=uri)
    conv = poll(lambda: wait_status(src, "active", 30).get("x-migd-convergence"), 30, "a convergence forecast")
    assert {"state", "dirty-rate", "working-set"} <= set(conv)
    src.cmd("migrate-set-parameters", **{"downtime-limit": 300})
    info = wait_status(src, "completed", 60)
    wait_status(dst, "completed", 30)
    assert digests(dst) == digests(src)
    assert 0 < info["downtime"] <= 300
    assert info["total-time"] < 20_000, info  # seconds, not the 84 s of the capped threshold
    assert info["ram"]["transferred"] < 1024 * MIB
    expected = info["x-migd-expected-downtime"]
    assert expected <= 300
    # never dangerously optimistic. How pessimistic it is depends on the host (the capped windows'
    # GIL contention with the vCPUs, gone in the final pass, and a round trip measured while both
    # daemons compete for 2 cores: x1.1 .. x5.3 measured here), so that ratio is a figure of
    # `bench/bench_scenarios.py --cases random,rate=32M,wss=32M:16M:300`, not a bound asserted here;
    # a far too pessimistic estimate would fail the total-time bound above.
    assert info["downtime"] / 2 - 5 <= expected, info


def test_a_guest_outrunning_its_link_is_reported_diverging(migd_factory, short_tmp: Path) -> None:
    """random,rate=100M,wss=128M at 32 MiB/s, limit 50 ms: never converges; said within 10 s."""
    src, dst, _, uri = _pair(migd_factory, "512M", "random,rate=100M,wss=128M", short_tmp)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 32 * MIB, "downtime-limit": 50})
    src.clear_events()
    t0 = time.monotonic()
    src.cmd("migrate", uri=uri)
    event = src.wait_event("X_MIGD_CONVERGENCE", lambda e: e["data"]["state"] == "diverging", timeout=30)
    took = time.monotonic() - t0
    assert event["data"]["working-set"] > 50 * MIB and event["data"]["dirty-rate"] > 0
    info = query(src)
    assert info["status"] == "active" and info["x-migd-convergence"]["state"] == "diverging"
    assert "eta-ms" not in info["x-migd-convergence"]
    assert "x-migd-policy-actions" not in info  # the built-in policy is off by default
    src.cmd("migrate_cancel")
    wait_status(src, "cancelled", 30)
    assert took <= 15, took  # issue 10 asks for 10 s; a loaded CI machine gets some slack


def test_progress_timeout_aborts_with_an_event_and_a_reason(migd_factory, short_tmp: Path) -> None:
    src, dst, _, uri = _pair(migd_factory, "256M", "random,rate=100M,wss=96M", short_tmp)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 * MIB, "downtime-limit": 20,
                                         "x-migd-progress-timeout": 3})
    src.clear_events()
    src.cmd("migrate", uri=uri)
    event = src.wait_event("X_MIGD_POLICY_ACTION", timeout=60)
    assert event["data"]["action"] == "abort" and "no progress for 3 s" in event["data"]["reason"]
    info = wait_status(src, "failed", 30)
    assert "x-migd-progress-timeout" in info["error-desc"]
    (act,) = info["x-migd-policy-actions"]
    assert act["action"] == "abort" and act["time-ms"] > 3000
    assert src.cmd("query-status")["status"] == "running"  # the guest keeps running at the source


def test_computed_throttle_makes_a_hot_guest_converge(migd_factory, short_tmp: Path) -> None:
    src, dst, _, uri = _pair(migd_factory, "256M", "random,rate=100M,wss=96M", short_tmp)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 * MIB, "downtime-limit": 50,
                                         "x-migd-auto-throttle": True})
    src.clear_events()
    src.cmd("migrate", uri=uri)
    event = src.wait_event("X_MIGD_POLICY_ACTION", lambda e: e["data"]["action"] == "throttle", timeout=60)
    assert 1 <= event["data"]["value"] <= 99
    info = wait_status(src, "completed", 120)
    wait_status(dst, "completed", 30)
    assert digests(dst) == digests(src)
    assert info["downtime"] <= 50 * 1.5, info
    assert any(a["action"] == "throttle" for a in info["x-migd-policy-actions"])


@pytest.mark.parametrize("delay", [0.01, 0.05])
def test_long_round_trip_never_stalls_the_switchover(migd_factory, short_tmp: Path, delay: float) -> None:
    """Issue 10: with >= 5 ms each way the catch-up PING restarted forever; 128 MiB, counter,rate=4M."""
    src, dst, relay, uri = _pair(migd_factory, "128M", "counter,rate=4M", short_tmp, delay)
    assert relay is not None
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        src.cmd("migrate", uri=uri)
        info = wait_status(src, "completed", 60)
        wait_status(dst, "completed", 30)
        assert digests(dst) == digests(src)
        # the destination's answer takes one round trip: it is in the estimate and in the downtime
        assert info["downtime"] >= 2 * delay * 1000 * 0.9
        assert info["x-migd-expected-downtime"] >= 2 * delay * 1000 * 0.9, info
        assert info["downtime"] <= 300
    finally:
        relay.close()


def test_downtime_steps_raise_the_limit_until_it_converges(migd_factory, short_tmp: Path) -> None:
    """Nova's schedule, built in: 3 steps up to 1 s, 2 s per GiB apart (0.5 s for 256 MiB).

    The switch-over counts on 32 MiB/s for the final pass (avail-switchover-bandwidth): the 24 MiB
    working set fits only the last step's 1 s, and the real final pass, several times faster even on
    a loaded host, ends far below it. (Counting on the link capacity measured behind the 16 MiB/s cap,
    a 96 MiB set was predicted at 241 ms and took 524 ms, up to 680 ms of the 999 ms under a CPU hog.)
    """
    src, dst, _, uri = _pair(migd_factory, "256M", "random,rate=100M,wss=24M", short_tmp)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 * MIB, "downtime-limit": 20,
                                         "avail-switchover-bandwidth": 32 * MIB,
                                         "x-migd-downtime-steps": 3, "x-migd-downtime-step-delay": 2,
                                         "x-migd-downtime-max": 1000})
    src.clear_events()
    src.cmd("migrate", uri=uri)
    event = src.wait_event("X_MIGD_POLICY_ACTION", lambda e: e["data"]["action"] == "downtime-limit", timeout=60)
    assert event["data"]["value"] > 20 and "downtime step" in event["data"]["reason"]
    info = wait_status(src, "completed", 120)
    wait_status(dst, "completed", 30)
    assert digests(dst) == digests(src)
    raised = [a["value"] for a in info["x-migd-policy-actions"] if a["action"] == "downtime-limit"]
    assert raised == sorted(raised) and raised[-1] <= 1000
    assert info["downtime"] <= raised[-1], info
    assert src.cmd("query-migrate-parameters")["downtime-limit"] == 20  # the user's parameter stays
