"""The migration thread: counters' formulas, rate limit, auto-converge, completion, cancel from each state.

Destinations are real: a second Machine in this process loading the stream through the real loader
(``savevm.load_stream``) and acknowledging on the return path, or a socket peer that discards or
stalls. Every wait is on a condition with a timeout.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from migration_harness import Harness

from migd.bql import BQL
from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.machine.vcpu import VCPUSet
from migd.migration.outgoing import MigrationThread, PhaseClock
from migd.migration.returnpath import ReturnPathReader, send_shut
from migd.migration.status import MigrationStatus as M
from migd.migration.stream import OutStream
from migd.migration.throttle import AutoConverge
from migd.transports.channel import SocketChannel

MEM = 16 << 20


@pytest.fixture
async def h():
    harness = Harness(asyncio.get_running_loop(), memory=MEM)
    harness.migration.config.set_capabilities([("events", True)])
    harness.machine.start()
    yield harness
    harness.close()


# -- auto-converge ------------------------------------------------------------------------------

def _ac(params: dict[str, Any] | None = None) -> tuple[AutoConverge, VCPUSet]:
    from migd.migration.params import DEFAULT_PARAMETERS

    p = {**DEFAULT_PARAMETERS, **(params or {})}
    vcpus = VCPUSet(1)
    return AutoConverge(vcpus, lambda: p), vcpus


def test_auto_converge_triggers_on_the_second_hot_period_then_steps() -> None:
    ac, vcpus = _ac()
    ac.trigger(bytes_xfer_period=100, bytes_dirty_period=51)  # 51 > 50 % of 100, first time
    assert ac.percentage == 0
    ac.trigger(100, 10)  # a quiet period does not reset the counter
    ac.trigger(100, 60)
    assert ac.percentage == 20 and vcpus.throttle_percentage == 20
    for expected in (30, 40):
        ac.trigger(100, 60)
        ac.trigger(100, 60)
        assert ac.percentage == expected
    ac.stop()
    assert ac.percentage == 0 and vcpus.throttle_percentage == 0


def test_auto_converge_caps_at_max_cpu_throttle_and_honours_threshold() -> None:
    ac, vcpus = _ac({"max-cpu-throttle": 45, "cpu-throttle-increment": 20, "throttle-trigger-threshold": 80})
    ac.trigger(100, 79)
    ac.trigger(100, 79)
    assert ac.percentage == 0  # below 80 %
    for _ in range(8):
        ac.trigger(100, 90)
    assert ac.percentage == 45 and vcpus.throttle_percentage == 45


def test_auto_converge_tailslow_takes_smaller_steps_near_the_goal() -> None:
    ac, _ = _ac({"cpu-throttle-tailslow": True, "cpu-throttle-increment": 30})
    ac.trigger(100, 60)
    ac.trigger(100, 60)
    assert ac.percentage == 20
    ac.trigger(100, 60)
    ac.trigger(100, 60)
    # cpu_now 80, ideal 80 * 50/60 = 66.7 -> step 13 (< 30)
    assert ac.percentage == 33


def test_auto_converge_periods_from_syncs() -> None:
    ac, _ = _ac()
    ac.note_sync(0, transferred=0, page_size=4096, now=0.0)  # starts the period
    ac.note_sync(100, transferred=100_000, page_size=4096, now=0.5)  # inside the period
    ac.note_sync(100, transferred=200_000, page_size=4096, now=1.2)  # 200 pages dirty vs 200 kB sent
    assert ac.dirty_rate_high_cnt == 1
    ac.note_sync(300, transferred=400_000, page_size=4096, now=2.3)
    assert ac.percentage == 20


# -- counters, rate limit -----------------------------------------------------------------------

def _idle_thread(h: Harness) -> tuple[MigrationThread, socket.socket]:
    a, b = socket.socketpair()
    ms = h.migration
    ms._reset("unix:test")
    ms.channel = SocketChannel(a)
    ms.stream = OutStream(ms.channel)
    thread = MigrationThread(ms)
    ms.thread = thread
    return thread, b


async def test_counters_follow_qemu_formulas(h: Harness) -> None:
    thread, peer = _idle_thread(h)
    try:
        ms, stats = h.migration, h.migration.stats
        ms.config.set_parameters({"downtime-limit": 300})
        thread._iter_start, thread._iter_bytes, thread._iter_pages, thread._iter_busy = 10.0, 0, 0, 0.0
        thread.stream.transferred = 50_000_000  # 50 MB in 200 ms
        thread.stream.write_busy = 0.05  # 50 ms of it inside channel writes: the link does 1 GB/s
        thread._iter_save = 0.2  # all of it sending pages
        stats.normal, stats.duplicate = 12_000, 0
        stats.dirty_pages = 5_000  # 20.48 MB remaining
        thread._update_counters(10.2)
        assert thread.bandwidth == pytest.approx(250_000)  # bytes/ms
        assert stats.mbps == pytest.approx(50_000_000 * 8 / 0.2 / 1e6)
        assert stats.pages_per_second == 60_000
        policy = thread.policy
        assert policy.capacity.value == pytest.approx(1e9)
        # no rate-limit sleep, all of it page work: the final pass costs what the window cost per byte
        assert policy.final_rate() == pytest.approx(250e6)
        fixed = policy.fixed_ms()
        # the decision lets the final pass run at least 25 % slower than estimated
        assert policy.decision_rate() == pytest.approx(0.75 * 250e6)
        assert thread.threshold == pytest.approx((300 - fixed) / 1000 * 0.75 * 250e6, abs=1)
        assert ms.expected_downtime == round(fixed + 5_000 * 4096 / 250e6 * 1000)
        assert thread.stream._window_start == 50_000_000 and thread._iter_start == 10.2
        # avail-switchover-bandwidth replaces the measured rate (bytes/s, QEMU's meaning)
        ms.config.set_parameters({"avail-switchover-bandwidth": 1_000_000_000})
        thread.stream.transferred += 1_000_000
        thread._update_counters(10.3)
        assert thread.threshold == pytest.approx((300 - fixed) / 1000 * 1e9, abs=1)
        assert ms.expected_downtime == round(fixed + 5_000 * 4096 / 1e9 * 1000)
    finally:
        thread.stream.close()
        peer.close()


async def test_a_capped_window_still_measures_the_link(h: Harness) -> None:
    """32 MiB/s cap: 3.3 MB per window, 3 ms inside writes, 80 ms asleep. The final pass runs
    uncapped, so the threshold is computed at the rate the thread works at, not at the cap."""
    thread, peer = _idle_thread(h)
    try:
        ms, stats = h.migration, h.migration.stats
        t = 0.0
        for _ in range(5):
            thread._new_window(t)
            thread.stream.transferred += 3_300_000
            thread.stream.write_busy += 0.003
            thread._iter_sleep = 0.08
            thread._iter_save = 0.02  # of the 20 ms awake, all sending pages
            stats.normal += 3_300_000 // 4096
            t += 0.1
            thread._update_counters(t)
        policy = thread.policy
        assert thread.bandwidth == pytest.approx(33_000)  # bytes/ms: the cap
        assert policy.capacity.value == pytest.approx(1.1e9)
        assert policy.final_rate() == pytest.approx(3_300_000 / 0.02)
        assert thread.threshold > 3 * 33_000 * 300  # QEMU's capped threshold would be 33_000 * 300
        assert "state" in ms.convergence and ms.convergence["link-capacity"] == int(policy.capacity.value)
    finally:
        thread.stream.close()
        peer.close()


async def test_max_bandwidth_applies_at_once_until_switchover(h: Harness) -> None:
    thread, peer = _idle_thread(h)
    try:
        thread.apply_rate_limit()
        assert thread.stream.rate_limit == 134217728 // 10
        h.migration.set_parameters({"max-bandwidth": 10_000_000})
        assert thread.stream.rate_limit == 1_000_000
        thread._set_unlimited()
        h.migration.set_parameters({"max-bandwidth": 20_000_000})
        assert thread.stream.rate_limit == 0  # the final pass stays unlimited
    finally:
        thread.stream.close()
        peer.close()


def test_phase_clock_phases_add_up() -> None:
    clock = PhaseClock()
    for name in ("a", "b", "a", "c"):
        deadline = time.monotonic() + 0.002
        while time.monotonic() < deadline:
            pass
        clock.mark(name)
    assert set(clock.phases) == {"a", "b", "c"}
    assert sum(clock.phases.values()) == pytest.approx(clock.total_ms(), abs=1e-6)


# -- whole migrations -----------------------------------------------------------------------------

@pytest.fixture(autouse=False)
def savevm() -> Any:
    return pytest.importorskip("migd.migration.savevm")


class Destination:
    """A real destination in this process: a Machine loading the stream, SHUT on the return path."""

    def __init__(self, memory: int = MEM) -> None:
        self.events = EventSink()
        self.runstate = RunStateMachine(RunState.INMIGRATE)
        self.machine = Machine(MachineConfig(memory=memory), self.runstate, self.events)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.error: str | None = None
        self.loaded = threading.Event()
        self.pings: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def listen(self, path: str) -> str:
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread.start()
        return f"unix:{path}"

    def _run(self) -> None:
        from migd.migration import returnpath
        from migd.migration.stream import InStream

        conn, _ = self.listener.accept()
        channel = SocketChannel(conn)
        try:
            from migd.migration.savevm import load_stream

            def on_command(cmd: int, payload: bytes = b"") -> None:  # as the real incoming side
                if cmd == 2 and len(payload) == 4:  # PING -> PONG on the return path
                    self.pings.append(int.from_bytes(payload, "big"))
                    returnpath.send_pong(channel, int.from_bytes(payload, "big"))

            load_stream(InStream(channel), self.machine, on_command=on_command)
        except Exception as exc:
            self.error = str(exc)
        self.loaded.set()
        try:
            returnpath.send_shut(channel, 1 if self.error else 0)
        except OSError:
            pass
        channel.close()

    def close(self) -> None:
        self.listener.close()
        self.machine.shutdown()


class Peer:
    """A socket peer that accepts and then discards (``read=True``) or never reads (stalls)."""

    def __init__(self, read: bool) -> None:
        self.read = read
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.received = 0
        self.eof = threading.Event()
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.stop = threading.Event()

    def listen(self, path: str) -> str:
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread.start()
        return f"unix:{path}"

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        if not self.read:
            self.stop.wait(60)
        buf = bytearray(1 << 20)
        while True:
            try:
                n = conn.recv_into(buf)
            except OSError:
                break
            if not n:
                break
            self.received += n
        self.eof.set()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        if self.conn is not None:
            self.conn.close()


def ram_digest(machine: Machine) -> list[bytes]:
    import hashlib

    return [hashlib.sha256(b.buf).digest() for b in machine.ram.blocks()]


def fill_ram(machine: Machine, seed: int = 1) -> None:
    import numpy as np

    block = machine.ram.blocks()[0]
    rng = np.random.default_rng(seed)
    pages = block.npages
    # half random pages, half zero pages
    data = rng.integers(0, 255, size=(pages // 2, 4096), dtype=np.uint8)
    block.pages[: pages // 2] = data


async def test_complete_migration_with_acknowledged_load(h: Harness, tmp_path, savevm: Any) -> None:
    ms = h.migration
    ms.config.set_parameters({"max-bandwidth": 0})
    fill_ram(h.machine)
    dest = Destination()
    try:
        uri = dest.listen(str(tmp_path / "mig.sock"))
        await ms.start(uri)
        await h.wait_status(M.COMPLETED, M.FAILED, timeout=60)
        await ms.wait_done(10)
        info = ms.query()
        assert info["status"] == "completed", info
        assert dest.loaded.wait(10) and dest.error is None
        assert dest.pings[0] == 1 and len(dest.pings) >= 2  # header PING, then the catch-up before the stop
        assert ram_digest(dest.machine) == ram_digest(h.machine)
        assert h.runstate.state is RunState.POSTMIGRATE
        assert set(info) == {"status", "ram", "total-time", "downtime", "setup-time", "x-migd-downtime-phases",
                             "x-migd-expected-downtime"}
        # a migration shorter than one 100 ms window still gets a measured estimate, not the limit
        assert info["x-migd-expected-downtime"] < 300, info
        phases = info["x-migd-downtime-phases"]
        assert {"stop-vcpus", "drain-flush", "ram-final", "device-state", "eof-flush", "wait-ack"} <= set(phases)
        assert abs(sum(phases.values()) - info["downtime"]) <= 2
        ram = info["ram"]
        assert ram["remaining"] == 0 and ram["dirty-pages-rate"] == 0
        assert ram["total"] == MEM and ram["page-size"] == 4096
        assert ram["normal"] + ram["duplicate"] >= MEM // 4096
        assert ram["transferred"] >= ram["normal-bytes"] == ram["normal"] * 4096
        assert ram["precopy-bytes"] + ram["downtime-bytes"] <= ram["transferred"]
        names = h.names()
        assert names[0] == "setup" and "active" in names and names[-1] == "completed"
        assert names.index("STOP") < names.index("device") < names.index("completed")
        assert "MIGRATION_PASS" in names
        # the source now refuses a second migration, like QEMU
        from migd.migration.state import MigrationError

        with pytest.raises(MigrationError, match="previous migration"):
            await ms.start(uri)
    finally:
        dest.close()


async def test_failed_destination_load_fails_the_source_and_resumes_it(h: Harness, tmp_path, savevm: Any) -> None:
    """A destination that is too small rejects the stream and says so with SHUT(1)."""
    ms = h.migration
    ms.config.set_parameters({"max-bandwidth": 0})
    dest = Destination(memory=MEM // 2)
    try:
        await ms.start(dest.listen(str(tmp_path / "mig.sock")))
        await h.wait_status(M.FAILED, M.COMPLETED, timeout=60)
        await ms.wait_done(10)
        assert ms.status is M.FAILED
        desc = ms.query()["error-desc"]
        # the destination's SHUT(1), also when a write failed before the return path read it
        assert desc == "Sibling indicated error 1", desc
        assert h.runstate.state is RunState.RUNNING
    finally:
        dest.close()


def test_a_failed_write_is_reported_with_the_shut_sent_before_the_close(channel_pair) -> None:
    """A destination that refuses sends SHUT(1), then closes; the source's next write can fail
    (EPIPE) before its return-path reader has read that SHUT. The failure names the destination's
    reason, not the broken pipe it caused (CI saw "Unable to write to channel: Broken pipe" once)."""
    src, dst = channel_pair
    reader = ReturnPathReader(src)  # not started yet: the SHUT sits unread
    send_shut(dst, 1)
    side = SimpleNamespace(rp=reader, stream=SimpleNamespace(error="Unable to write to channel: Broken pipe"),
                           _silence=None)
    assert MigrationThread._peer_error(side) is None  # what the thread knows at that moment
    starter = threading.Timer(0.05, reader.start)
    starter.start()
    try:
        assert MigrationThread._peer_error(side, after_write_error=True) == "Sibling indicated error 1"
    finally:
        starter.join()
        reader.close()


async def test_peer_gone_mid_migration_fails_with_error_desc_guest_running(h: Harness, tmp_path, savevm: Any) -> None:
    ms = h.migration
    ms.config.set_parameters({"max-bandwidth": 4 << 20})  # slow enough to be caught mid-way
    fill_ram(h.machine)
    peer = Peer(read=True)
    try:
        await ms.start(peer.listen(str(tmp_path / "mig.sock")))
        await h.wait_for(lambda: peer.received > 0 and ms.status is M.ACTIVE)
        peer.close()
        await h.wait_status(M.FAILED, timeout=30)
        await ms.wait_done(10)
        assert ms.query()["error-desc"]
        assert h.runstate.state is RunState.RUNNING
        assert ms.thread is None
    finally:
        peer.close()


async def _cancel_and_check(h: Harness, peer_or_dest: Any) -> None:
    ms = h.migration
    await ms.cancel()  # returns once the thread wound down (a blocked write fails at once)
    assert ms.status is M.CANCELLED
    assert ms.query() == {"status": "cancelled"}
    assert ms.thread is None
    assert h.runstate.state is RunState.RUNNING
    names = h.names()
    assert names[-1] == "cancelled" and names[-2] in ("cancelling", "RESUME")
    assert not any(t.name == "mig/src/main" for t in threading.enumerate())


async def test_cancel_in_setup(h: Harness, tmp_path, savevm: Any) -> None:
    ms = h.migration
    peer = Peer(read=True)
    try:
        BQL.acquire()  # the thread's setup needs the big lock: it stays in setup
        try:
            await ms.start(peer.listen(str(tmp_path / "mig.sock")))
            await h.wait_for(lambda: ms.thread is not None)
            assert ms.status is M.SETUP
            cancel = asyncio.ensure_future(ms.cancel())
            await h.wait_status(M.CANCELLING)
        finally:
            BQL.release()
        await cancel
        await _cancel_and_check(h, peer)
        assert peer.eof.wait(10)  # the channel was closed
    finally:
        peer.close()


async def test_cancel_in_active_with_a_blocked_write(h: Harness, tmp_path, savevm: Any) -> None:
    ms = h.migration
    ms.config.set_parameters({"max-bandwidth": 0})
    fill_ram(h.machine)
    peer = Peer(read=False)  # never reads: the thread ends up blocked in a write
    try:
        await ms.start(peer.listen(str(tmp_path / "mig.sock")))
        await h.wait_status(M.ACTIVE)
        await h.wait_for(lambda: ms.stream is not None and ms.stream.transferred > 0)
        await _cancel_and_check(h, peer)
        # an immediate new migration works
        dest = Destination()
        try:
            await ms.start(dest.listen(str(tmp_path / "mig2.sock")))
            await h.wait_status(M.COMPLETED, M.FAILED, timeout=60)
            assert ms.status is M.COMPLETED, ms.query()
        finally:
            dest.close()
    finally:
        peer.close()


async def test_cancel_in_pre_switchover_resumes_the_guest(h: Harness, tmp_path, savevm: Any, monkeypatch) -> None:
    from migd.migration import outgoing

    monkeypatch.setattr(outgoing, "PONG_TIMEOUT", 0.3)  # this peer never answers the catch-up PING
    ms = h.migration
    ms.config.set_capabilities([("pause-before-switchover", True)])
    ms.config.set_parameters({"max-bandwidth": 0})
    peer = Peer(read=True)
    try:
        await ms.start(peer.listen(str(tmp_path / "mig.sock")))
        await h.wait_status(M.PRE_SWITCHOVER, timeout=60)
        assert h.runstate.state is RunState.FINISH_MIGRATE
        info = ms.query()
        assert info["status"] == "pre-switchover" and "expected-downtime" in info and "ram" in info
        await _cancel_and_check(h, peer)
        assert h.names()[-2] == "RESUME"
    finally:
        peer.close()


async def test_pre_switchover_continue_completes(h: Harness, tmp_path, savevm: Any) -> None:
    ms = h.migration
    ms.config.set_capabilities([("pause-before-switchover", True)])
    ms.config.set_parameters({"max-bandwidth": 0})
    dest = Destination()
    try:
        await ms.start(dest.listen(str(tmp_path / "mig.sock")))
        await h.wait_status(M.PRE_SWITCHOVER, timeout=60)
        from migd.migration.state import MigrationError

        with pytest.raises(MigrationError, match="^Migration not in expected state: pre-switchover$"):
            ms.continue_("device")
        ms.continue_("pre-switchover")
        await h.wait_status(M.COMPLETED, M.FAILED, timeout=60)
        assert ms.status is M.COMPLETED
        assert "pre-switchover" in ms.query()["x-migd-downtime-phases"]
        assert ram_digest(dest.machine) == ram_digest(h.machine)
    finally:
        dest.close()


async def test_cancel_in_device_while_waiting_for_the_ack(h: Harness, tmp_path, savevm: Any, monkeypatch) -> None:
    from migd.migration import outgoing

    monkeypatch.setattr(outgoing, "PONG_TIMEOUT", 0.3)  # this peer never answers the catch-up PING
    """The peer reads everything but never acknowledges: the source waits in `device`."""
    ms = h.migration
    ms.config.set_parameters({"max-bandwidth": 0})
    peer = Peer(read=True)
    try:
        await ms.start(peer.listen(str(tmp_path / "mig.sock")))
        await h.wait_status(M.DEVICE, timeout=60)
        await _cancel_and_check(h, peer)
        assert h.names()[-2] == "RESUME"
    finally:
        peer.close()


async def test_no_return_path_completes_without_ack(h: Harness, tmp_path, savevm: Any) -> None:
    ms = h.migration
    ms.config.set_capabilities([("return-path", False)])
    ms.config.set_parameters({"max-bandwidth": 0})
    peer = Peer(read=True)
    try:
        await ms.start(peer.listen(str(tmp_path / "mig.sock")))
        await h.wait_status(M.COMPLETED, M.FAILED, timeout=60)
        assert ms.status is M.COMPLETED
        assert "wait-ack" not in ms.query()["x-migd-downtime-phases"]
    finally:
        peer.close()


async def test_auto_converge_throttles_a_hot_guest_and_stops_at_the_end(tmp_path, savevm: Any) -> None:
    """A guest dirtying 64 MB/s against a 4 MB/s migration: throttled, shown, removed on cancel."""
    h = Harness(asyncio.get_running_loop(), memory=MEM, workload="random,rate=64M")
    try:
        h.machine.start()
        ms = h.migration
        ms.config.set_capabilities([("auto-converge", True)])
        # the final pass runs uncapped, so 16 MiB would fit in the downtime at once: the switch-over
        # is told it has only the 4 MB/s too (QEMU's avail-switchover-bandwidth), so it never fits
        ms.config.set_parameters({"max-bandwidth": 4 << 20, "avail-switchover-bandwidth": 4 << 20})
        # hot before the migration starts: a first pass of untouched RAM takes milliseconds, and with
        # nothing dirty at its end the switch-over would rightly go ahead at once
        await h.wait_for(lambda: sum(v.stats.bytes_written for v in h.machine.vcpus) > 4 << 20, timeout=30)
        peer = Peer(read=True)
        try:
            await ms.start(peer.listen(str(tmp_path / "mig.sock")))
            await h.wait_for(lambda: "cpu-throttle-percentage" in ms.query(), timeout=60)
            info = ms.query()
            assert info["status"] == "active" and info["cpu-throttle-percentage"] >= 20
            assert h.machine.vcpus.throttle_percentage >= 20
            await ms.cancel()
            assert ms.status is M.CANCELLED
            assert h.machine.vcpus.throttle_percentage == 0
            assert "cpu-throttle-percentage" not in ms.query()
        finally:
            peer.close()
    finally:
        h.close()


async def test_rate_limit_holds_over_seconds_and_changes_at_once(tmp_path, savevm: Any) -> None:
    """max-bandwidth caps the real byte rate (within 5 % over ~3 s); a new value applies at once."""
    big = Harness(asyncio.get_running_loop(), memory=256 << 20)
    try:
        big.machine.start()
        ms = big.migration
        block = big.machine.ram.blocks()[0]
        block.buf[:] = 0x5A  # every page is data (non-zero), so bytes ~ pages
        limit = 20_000_000
        ms.config.set_parameters({"max-bandwidth": limit})
        peer = Peer(read=True)
        try:
            await ms.start(peer.listen(str(tmp_path / "mig.sock")))

            async def rate_between(lo: int, hi: int) -> float:
                await big.wait_for(lambda: ms.stream is not None and ms.stream.transferred >= lo)
                b0, t0 = ms.stream.transferred, time.monotonic()
                await big.wait_for(lambda: ms.stream.transferred >= hi)
                return (ms.stream.transferred - b0) / (time.monotonic() - t0)

            rate = await rate_between(4_000_000, 64_000_000)
            assert 0.5 * limit <= rate <= 1.05 * limit, rate
            ms.set_parameters({"max-bandwidth": 2 * limit})
            sent = ms.stream.transferred
            rate2 = await rate_between(sent + 4_000_000, sent + 84_000_000)
            assert 1.05 * limit < rate2 <= 1.05 * 2 * limit, rate2
            await ms.cancel()
        finally:
            peer.close()
    finally:
        big.close()


async def test_cancel_while_connecting_then_a_new_migration(h: Harness, tmp_path, savevm: Any) -> None:
    """A connect blocked on a full backlog: cancel ends at once; the late connection is dropped."""
    ms = h.migration
    path = str(tmp_path / "busy.sock")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(path)
    busy.listen(0)
    fillers = []
    for _ in range(4):  # fill the backlog: the next connect(2) blocks until an accept
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    dest = Destination()
    try:
        await ms.start(f"unix:{path}")
        assert ms.status is M.SETUP and ms.thread is None
        await ms.cancel()
        assert ms.status is M.CANCELLED and h.names()[-2:] == ["cancelling", "cancelled"]
        ms.config.set_parameters({"max-bandwidth": 0})
        await ms.start(dest.listen(str(tmp_path / "mig.sock")))
        for _ in fillers:  # now the old connect goes through, late
            busy.accept()[0].close()
        busy.settimeout(30)
        late, _ = await h.loop.run_in_executor(None, busy.accept)
        late.settimeout(30)
        assert await h.loop.run_in_executor(None, late.recv, 1) == b""  # closed unused by the source
        late.close()
        await h.wait_status(M.COMPLETED, M.FAILED)
        assert ms.status is M.COMPLETED, ms.query()
        assert ram_digest(dest.machine) == ram_digest(h.machine)
    finally:
        for s in fillers:
            s.close()
        busy.close()
        dest.close()


async def test_a_load_pace_report_is_matched_to_the_runs_it_loaded(h: Harness) -> None:
    """The destination's bytes read are the source's stream bytes: the marks left after each batch
    (bytes written, runs sent) tell how many runs a LOAD_PACE span loaded, interpolated inside a
    batch."""
    thread, peer = _idle_thread(h)
    try:
        assert thread._runs_at(1000) is None  # nothing sent yet
        thread._run_marks.extend([(1000, 10), (3000, 30), (7000, 30)])
        assert thread._runs_at(500) is None  # before the first batch ended: not known
        assert thread._runs_at(1000) == 10
        assert thread._runs_at(2000) == 20
        assert thread._runs_at(5000) == 30
        assert thread._runs_at(9000) == 30  # past the last mark: all sent so far
    finally:
        thread.stream.close()
        peer.close()
