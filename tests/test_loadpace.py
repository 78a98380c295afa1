"""[migd] The destination's load pace on the return path (feature LOAD_PACE, docs/FORMAT.md §6).

The wire message over a real socketpair; the meter on a real socket; and real migd <-> migd
migrations in one process (a source MigrationState and thread, a destination IncomingMigration, a
unix socket between them): one that negotiates the feature, one whose destination plays an older
migd that does not know it, and one whose reports arrive malformed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from migration_harness import Harness
from test_commit import MEM, TIMEOUT, DestHarness

from migd import transports
from migd.machine.runstate import RunState
from migd.migration import policytrace
from migd.migration.format import FEATURE_LOAD_PACE, FEATURES_SUPPORTED
from migd.migration.incoming import IncomingMigration
from migd.migration.loadpace import LoadMeter
from migd.migration.policy import DRAIN_MS, SwitchoverPolicy
from migd.migration.returnpath import (
    MSG_X_MIGD_LOAD_PACE,
    ReturnPathError,
    ReturnPathReader,
    ReturnPathWriter,
)
from migd.migration.status import MigrationStatus as M
from migd.transports.channel import Channel, ChannelFilter, SocketChannel

PACE_HEADER = struct.pack(">HH", MSG_X_MIGD_LOAD_PACE, 48)


# -- the message ----------------------------------------------------------------------------------

def test_load_pace_round_trip_after_features(channel_pair: Any) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    w = ReturnPathWriter(dst)
    w.features(FEATURES_SUPPORTED, 4000)
    w.load_pace(1 << 33, 70000, 1_500_000, 250_000, 1_200_000)
    w.load_pace((1 << 33) + 4096, 70001, 1_500_100, 250_000, 1_200_090, ping=7, held_us=15_000)
    w.shut(0)
    assert reader.wait_for_shut(timeout=10) == 0
    assert reader.pace_count == 2
    (first, second), count = reader.paces_after(0)
    assert count == 2
    assert (first.bytes_read, first.pages, first.busy_s, first.wait_s, first.cpu_s) == (1 << 33, 70000, 1.5,
                                                                                          0.25, 1.2)
    assert (first.ping, first.held_s) == (0, 0.0) and (second.ping, second.held_s) == (7, 0.015)
    assert second.bytes_read == (1 << 33) + 4096 and second.arrived >= first.arrived
    assert reader.paces_after(1) == ([second], 2) and reader.paces_after(2) == ([], 2)
    reader.close()


def test_load_pace_wire_bytes(channel_pair: Any) -> None:
    src, dst = channel_pair
    ReturnPathWriter(dst).load_pace(1, 2, 3, 4, 5, 6, 7)
    raw = src.sock.recv(64)
    assert raw == PACE_HEADER + struct.pack(">QQQQQII", 1, 2, 3, 4, 5, 6, 7)


@pytest.mark.parametrize(("features", "length", "error"), [
    (FEATURES_SUPPORTED & ~FEATURE_LOAD_PACE, 48, "Received invalid message 0x4d03 length 0x0030"),
    (FEATURES_SUPPORTED, 40, "Received invalid message 0x4d03 length 0x0028"),
    (FEATURES_SUPPORTED, 0, "Received invalid message 0x4d03 length 0x0000"),
])
def test_load_pace_not_agreed_or_of_the_wrong_length_is_refused(channel_pair: Any, features: int, length: int,
                                                                error: str) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    ReturnPathWriter(dst).features(features, 4000)
    dst.write_all([struct.pack(">HH", MSG_X_MIGD_LOAD_PACE, length) + b"\0" * length])
    with pytest.raises(ReturnPathError) as info:
        reader.wait_for_shut(timeout=10)
    assert str(info.value) == error
    assert reader.pace_count == 0
    reader.close()


def test_load_pace_before_features_is_refused(channel_pair: Any) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    ReturnPathWriter(dst).load_pace(1, 2, 3, 4, 5)
    with pytest.raises(ReturnPathError, match="^Received invalid message 0x4d03 length 0x0030$"):
        reader.wait_for_shut(timeout=10)
    reader.close()


# -- the meter ------------------------------------------------------------------------------------

def test_meter_counts_bytes_and_no_wait_while_data_is_there() -> None:
    a, b = socket.socketpair()
    meter = LoadMeter(SocketChannel(b))
    try:
        assert meter.exact
        a.sendall(b"x" * 100_000)
        buf = bytearray(65536)
        got = 0
        while got < 100_000:  # bounded: 100,000 bytes are in the socket
            got += meter.read_into(memoryview(buf)[: min(65536, 100_000 - got)])
        assert meter.bytes_read == 100_000
        assert meter.wait_s == 0.0  # every read found data: none was timed as a wait
        read, pages, busy_us, wait_us, cpu_us = meter.totals()
        assert meter.held() >= 0.0
        assert (read, pages, wait_us) == (100_000, 0, 0) and busy_us >= 0 and cpu_us >= 0
        a.shutdown(socket.SHUT_WR)
        assert meter.read_into(buf) == 0  # EOF through the channel's own read
    finally:
        a.close()
        meter.close()


class SignallingSocket(socket.socket):
    """A real socket that says when a non-blocking read found it empty."""

    empty = threading.Event()

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes, flags)
        except BlockingIOError:
            self.empty.set()
            raise


def test_meter_times_a_read_that_found_the_socket_empty() -> None:
    a, b = socket.socketpair()
    sock = SignallingSocket(b.family, b.type, fileno=b.detach())
    sock.empty = threading.Event()
    meter = LoadMeter(SocketChannel(sock))

    def writer() -> None:  # writes only once the reader found nothing (then it blocks, or is about to)
        if sock.empty.wait(30):
            a.sendall(b"y" * 10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        buf = bytearray(64)
        assert meter.read_into(buf) == 10
        assert meter.wait_s > 0 and meter.bytes_read == 10
        assert meter.totals()[3] == int(meter.wait_s * 1e6)
    finally:
        t.join(30)
        a.close()
        meter.close()


def test_meter_of_a_wrapped_channel_is_not_exact() -> None:
    """TLS or any layer over the socket: waits cannot be told from work, so no pace is offered."""
    class Layer(SocketChannel):
        pass

    a, b = socket.socketpair()
    try:
        assert not LoadMeter(Layer(b)).exact
    finally:
        a.close()
        b.close()


def test_the_policy_learns_the_destinations_pace_from_reports() -> None:
    """Spans of data pages give the pace on a CPU (bytes / CPU s) and as it went (bytes / busy s);
    the backlog is drained at the former, and the final pass goes no faster."""
    params = {"downtime-limit": 300, "max-bandwidth": 0, "avail-switchover-bandwidth": 0}
    policy = SwitchoverPolicy(lambda: params, 512 << 20, 0.0, peer_answers=True)
    policy.on_window(0.1, 100 << 20, 0.05, 0.1, 0.1, 100 << 20)  # 2 GB/s link, 0.5 ns/B of work: ~1 GB/s
    assert policy.drain_rate() == 0.0
    total, busy, cpu = 0, 0.0, 0.0
    for i in range(6):  # 4 MB of data pages per span: 40 ms busy, 10 on a CPU
        total, busy, cpu = total + (4 << 20), busy + 0.04, cpu + 0.01
        policy.on_load_pace(0.2 + i * 0.05, total, total // 4104, busy, 0.01 * i, cpu)
    assert policy.dest_pace() == pytest.approx((4 << 20) / 0.04)
    assert policy.drain_rate() == pytest.approx((4 << 20) / 0.01)
    assert policy.final_rate() <= policy.drain_rate()
    policy.on_backlog(4 << 20)
    assert policy.full_backlog_ms() == pytest.approx(10.0)


def test_the_decision_counts_on_the_slower_end() -> None:
    """The destination's pace as it goes (the slower quartile of its spans, the CPU shared as it is)
    bounds the rate the switch-over decision counts on: a final pass the destination slows down must
    not end above the limit (last session: 66 ms for 37, the final pass at half the predicted rate).
    Recorded, with the bound: 363 MB/s counted on for a final pass at 379; without it, 397."""
    params = {"downtime-limit": 50, "max-bandwidth": 128 << 20, "avail-switchover-bandwidth": 0}
    policy = SwitchoverPolicy(lambda: params, 512 << 20, 0.0, peer_answers=True)
    policy.on_sync(0.0, 512 << 20, 0)
    policy.on_sync(1.0, 64 << 20, 64 << 20)  # past the first pass
    policy.on_window(1.1, 12 << 20, 0.005, 0.02, 0.1, 12 << 20)  # the source alone: ~1 GB/s
    source_only = policy.decision_rate()
    total, busy = 0, 0.0
    policy.on_load_pace(1.15, 0, 0, 0.0, 0.0, 0.0)  # the first report: the totals spans start from
    for i, wall_ms in enumerate((40, 40, 10, 10, 10, 10)):  # 4 MB spans: 100 MB/s twice, 400 four times
        total, busy = total + (4 << 20), busy + wall_ms / 1000
        policy.on_load_pace(1.2 + i * 0.05, total, total // 4104, busy, 0.0, busy / 2)
    assert policy.decision_rate() <= (4 << 20) / 0.040 * 1.0001 < source_only
    assert policy.threshold() < (50 - policy.fixed_ms()) / 1000 * source_only


# -- real migrations ------------------------------------------------------------------------------

class Pace:
    """A source and a destination in one process over a unix socket, the source recording its
    policy trace (MIGD_POLICY_TRACE)."""

    def __init__(self, src: Harness, dst: DestHarness, path: Path, traces: Path) -> None:
        self.src, self.dst, self.path, self.traces = src, dst, path, traces

    async def run(self) -> None:
        uri = f"unix:{self.path}"
        assert self.dst.incoming is not None
        await self.dst.incoming.start()
        await self.src.migration.start(uri)
        ms, inc = self.src.migration, self.dst.incoming
        await self.src.wait_for(lambda: ms.status in (M.COMPLETED, M.FAILED, M.CANCELLED)
                                and inc.status in ("completed", "failed"), 60)
        await ms.wait_done(10)

    def trace(self) -> dict[str, Any]:
        files = sorted(self.traces.glob("policy-*.json"))
        assert len(files) == 1, files
        doc: dict[str, Any] = json.loads(files[0].read_text())
        return doc


@pytest.fixture
async def pace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pace]:
    traces = tmp_path / "traces"
    traces.mkdir()
    monkeypatch.setenv(policytrace.ENV, str(traces))
    loop = asyncio.get_running_loop()
    src = Harness(loop, memory=MEM, workload="random,rate=8M")
    src.migration.config.set_parameters({"max-bandwidth": 0, "x-migd-peer-timeout": TIMEOUT})
    src.machine.start()
    dst = DestHarness(loop)
    path = tmp_path / "mig.sock"
    dst.incoming = IncomingMigration(dst, f"unix:{path}", dst.migration.config)
    yield Pace(src, dst, path, traces)
    await loop.run_in_executor(None, dst.close)
    src.close()


async def test_a_migration_negotiates_load_pace_and_the_policy_hears_it(pace: Pace) -> None:
    await pace.run()
    ms, inc = pace.src.migration, pace.dst.incoming
    assert inc is not None
    assert ms.status is M.COMPLETED and inc.status == "completed", (ms.query(), inc.query())
    assert inc.features & FEATURE_LOAD_PACE
    meter = inc._meter
    assert meter is not None and meter.exact
    read, _, busy_us, wait_us, _ = meter.totals()
    assert read > MEM // 4096 * 8  # at least a record per page went through the meter
    assert busy_us + wait_us <= (time.monotonic() - meter.start) * 1e6 + 1  # one clock, split in two
    calls = pace.trace()["calls"]
    # the round trips waited for the report after each PONG (how long the destination held the PING)
    # and were taken: the switch-over waits for one
    assert [c for c in calls if c[0] == "on_rtt" and not c[2]]
    reports = [c[1:] for c in calls if c[0] == "on_load_pace"]
    assert reports, "no LOAD_PACE report reached the policy"  # one after each PONG at least
    for (_, b0, p0, busy0, wait0, _, r0), (_, b1, p1, busy1, wait1, _, r1) in zip(reports, reports[1:],
                                                                                   strict=False):
        assert b1 >= b0 and p1 >= p0 and busy1 >= busy0 and wait1 >= wait0  # totals only grow
        assert r0 is None or r1 is not None and r1 >= r0  # the source's runs those bytes carried, too


async def test_an_older_migd_destination_without_load_pace_still_completes(pace: Pace) -> None:
    assert pace.dst.incoming is not None
    pace.dst.incoming.supported = FEATURES_SUPPORTED & ~FEATURE_LOAD_PACE  # what an older migd accepts
    await pace.run()
    ms, inc = pace.src.migration, pace.dst.incoming
    assert ms.status is M.COMPLETED and inc.status == "completed", (ms.query(), inc.query())
    assert inc.features == FEATURES_SUPPORTED & ~FEATURE_LOAD_PACE
    assert not [c for c in pace.trace()["calls"] if c[0] == "on_load_pace"]
    assert pace.dst.runstate.state is RunState.RUNNING


class ShortPace(ChannelFilter):
    """The source's real channel, with the length of every LOAD_PACE header it reads changed to 16:
    a destination that sends a malformed report."""

    def __init__(self, inner: SocketChannel) -> None:
        super().__init__(inner)
        self.seen = 0

    def read_into(self, mv: Any) -> int:
        n = self.inner.read_into(mv)
        if n == 4 and bytes(mv[:4]) == PACE_HEADER:  # the reader reads each header on its own
            mv[2:4] = struct.pack(">H", 16)
            self.seen += 1
        return n


async def test_a_malformed_report_fails_the_migration_and_the_source_runs_on(
        pace: Pace, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[ShortPace] = []
    real_connect = transports.connect

    def connect(address: Any, fds: Any = None, *args: Any) -> Channel:
        inner = real_connect(address, fds, *args)
        assert isinstance(inner, SocketChannel)
        made.append(ShortPace(inner))
        return made[-1]

    monkeypatch.setattr(transports, "connect", connect)  # the fault injected on a real socket
    await pace.run()
    ms = pace.src.migration
    assert made and made[0].seen == 1
    assert ms.status is M.FAILED
    assert ms.query()["error-desc"] == "Received invalid message 0x4d03 length 0x0010"
    # the status is published first, the guest resumes a moment later (as in QEMU)
    await pace.src.wait_for(lambda: pace.src.runstate.state is RunState.RUNNING, 10)
    assert pace.dst.incoming is not None and pace.dst.incoming.status == "failed"
    assert pace.dst.runstate.state is not RunState.RUNNING


def test_the_threshold_leaves_room_for_the_backlog() -> None:
    """The destination loads the socket's backlog before the final pass: the threshold is what fits
    after it, so a switch-over is not decided on a final pass that fits only without it: all of it
    once a drain took too long, DRAIN_MS of it while the switch-over drains first."""
    params = {"downtime-limit": 50, "max-bandwidth": 0, "avail-switchover-bandwidth": 0}
    policy = SwitchoverPolicy(lambda: params, 512 << 20, 0.0)
    policy.on_window(0.1, 100 << 20, 0.05, 0.1, 0.1, 100 << 20)
    policy.on_load_pace(0.15, 0, 0, 0.0, 0.0, 0.0)
    for i in range(1, 4):  # 4 MB of data pages per 10 ms on a CPU: 400 MB/s
        policy.on_load_pace(0.15 + i * 0.05, i * (4 << 20), i * (4 << 20) // 4104, i * 0.02, 0.0, i * 0.01)
    policy.on_backlog(0)
    empty = policy.threshold()
    policy.on_backlog(8 << 20)  # 20 ms of loading at 400 MB/s
    budget = 50 - policy.fixed_ms()
    assert policy.threshold() == pytest.approx(empty * (budget - DRAIN_MS) / budget, rel=1e-3)
    policy.drain_gave_up = True
    assert policy.backlog_ms() == pytest.approx(20.0)
    assert policy.threshold() == pytest.approx(empty * (budget - 20) / budget, rel=1e-3)
    policy.on_backlog(32 << 20)  # 80 ms: nothing fits any more
    assert policy.threshold() == 0
