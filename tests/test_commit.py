"""The commit protocol between migd peers (docs/SWITCHOVER.md §2), in one process with real parts.

A real source (MigrationState + migration thread) migrates over a real unix socket to a real
destination (IncomingMigration loading into a second Machine). A ``FaultChannel`` around one side's
channel cuts (drops everything from then on, like a firewall rule), or kills (shuts the socket down,
like a dead process) that side's writes just before or just after one switch-over message: LOADED and
SHUT (destination), COMMIT (source). Each case checks which side runs: never both, and the one the
protocol promises.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from migration_harness import Harness

from migd import transports
from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.migration import incoming as incoming_mod
from migd.migration.format import CMD_X_MIGD_COMMIT, command
from migd.migration.incoming import IncomingMigration
from migd.migration.returnpath import MSG_SHUT, MSG_X_MIGD_LOADED
from migd.migration.state import MigrationError, MigrationState
from migd.migration.status import MigrationStatus as M
from migd.threads import LoopHandle
from migd.transports.channel import Channel, ChannelFilter, SocketChannel

MEM = 8 << 20
TIMEOUT = 1  # x-migd-peer-timeout on both sides, seconds
COMMIT_BYTES = command(CMD_X_MIGD_COMMIT)


def is_loaded(data: bytes) -> bool:
    return data[:2] == MSG_X_MIGD_LOADED.to_bytes(2, "big")


def is_shut(data: bytes) -> bool:
    return data[:2] == MSG_SHUT.to_bytes(2, "big")


def is_commit(data: bytes) -> bool:
    return data == COMMIT_BYTES


class FaultChannel(ChannelFilter):
    """A real SocketChannel whose writes, from the first one ``match`` accepts, are cut or killed.

    ``when="before"``: the matching write is itself affected; ``"after"``: it goes out, the rest not.
    cut: writes report success and go nowhere, shutdown/close send no FIN (reads still work).
    kill: the socket is shut down both ways (the peer sees EOF), every later call fails.
    delay: the matching write goes out ``delay`` seconds late (a slow peer), nothing else changes.
    """

    def __init__(self, inner: SocketChannel, match: Callable[[bytes], bool] | None, action: str,
                 when: str, delay: float = 0.0) -> None:
        super().__init__(inner)
        self.inner: SocketChannel = inner
        self.delay = delay
        self.match, self.action, self.when = match, action, when
        self.tripped = threading.Event()
        self._cut = False

    def _trip(self) -> None:
        self.tripped.set()
        if self.action == "cut":
            self._cut = True
        else:
            self.inner.shutdown()

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        total = sum(len(b) for b in bufs)
        if self._cut:
            return total
        hit = False
        if self.match is not None and not self.tripped.is_set() and total <= 64:
            hit = self.match(b"".join(bytes(b) for b in bufs))
        if self.action == "flip" and not self.tripped.is_set():
            # page data: a staging array of PAGE records, or pages sent straight from RAM (one page, a run)
            stages = [i for i, b in enumerate(bufs) if len(b) >= 4096 and (len(b) % 4104 == 0
                                                                        or len(b) % 4096 == 0)]
            if stages:  # one bit of page data changes on the wire: corruption in transit
                self.tripped.set()
                i = stages[0]
                page = bytearray(bufs[i])  # a copy: the source's guest RAM stays as it is
                page[8 + 2000] ^= 0x01
                return self.inner.write_vectored([*bufs[:i], page, *bufs[i + 1:]])
        if hit and self.action == "delay":
            self.tripped.set()
            time.sleep(self.delay)  # the injected fault itself, not a synchronisation
            return self.inner.write_vectored(bufs)
        if hit and self.when == "before":
            self._trip()
            if self._cut:
                return total
            raise OSError(32, "Broken pipe")
        if hit:  # noted before the write: the peer may act on the message (and the test look) at once
            self.tripped.set()
        n = self.inner.write_vectored(bufs)
        if hit:
            self._trip()
        return n

    def shutdown(self) -> None:
        if self._cut:  # wake our own reads without telling the peer
            try:
                self.inner.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            self.inner._shut = True
            return
        self.inner.shutdown()

    def close(self) -> None:
        if not self._cut:
            self.inner.close()


class DestHarness:
    """A MigrationHost for a destination, from real parts; exits are recorded, not taken."""

    def __init__(self, loop: asyncio.AbstractEventLoop, memory: int = MEM) -> None:
        self.loop = loop
        self._handle = LoopHandle(loop)
        self.events = EventSink(loop)
        self.runstate = RunStateMachine(RunState.INMIGRATE)
        self.machine = Machine(MachineConfig(memory=memory), self.runstate, self.events)
        self.autostart = True
        self.migration = MigrationState(self)
        self.migration.config.set_parameters({"x-migd-peer-timeout": TIMEOUT})
        self.exits: list[int] = []
        self.incoming: IncomingMigration | None = None

    def request_exit(self, code: int) -> None:
        self.exits.append(code)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        return self._handle.call_soon(fn, *args)

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(None, fn, *args)

    def held_machine(self) -> None:
        return None

    @property
    def running(self) -> bool:
        return self.runstate.state is RunState.RUNNING

    def close(self) -> None:
        if self.incoming is not None:
            self.incoming.close()
        self.machine.shutdown()


class Pair:
    """A source and a destination; either side's channel may be wrapped in a FaultChannel."""

    def __init__(self, src: Harness, dst: DestHarness, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.src, self.dst, self.path = src, dst, path
        self.src_fault: FaultChannel | None = None
        self.dst_fault: FaultChannel | None = None
        self._mp = monkeypatch
        self._keep: list[Channel] = []

    def fault(self, side: str, match: Callable[[bytes], bool], action: str, when: str,
              delay: float = 0.0) -> None:
        if side == "src":
            real_connect = transports.connect

            def connect(address: Any, fds: Any = None, *args: Any) -> Channel:
                inner = real_connect(address, fds, *args)
                assert isinstance(inner, SocketChannel)
                self.src_fault = FaultChannel(inner, match, action, when, delay)
                self._keep.append(inner)
                return self.src_fault

            self._mp.setattr(transports, "connect", connect)
        else:
            real_listen = incoming_mod.listen  # type: ignore[attr-defined]

            def listen(uri: Any, fds: Any = None) -> Any:
                listener = real_listen(uri, fds)
                real_accept = listener.accept

                def accept() -> Channel:
                    inner = real_accept()
                    assert isinstance(inner, SocketChannel)
                    self.dst_fault = FaultChannel(inner, match, action, when, delay)
                    self._keep.append(inner)
                    return self.dst_fault

                setattr(listener, "accept", accept)  # noqa: B010 - a real listener, its accept wrapped
                return listener

            self._mp.setattr(incoming_mod, "listen", listen)

    async def start(self) -> None:
        uri = f"unix:{self.path}"
        self.dst.incoming = IncomingMigration(self.dst, uri, self.dst.migration.config)
        await self.dst.incoming.start()
        await self.src.migration.start(uri)

    async def settle(self, timeout: float = 30) -> None:
        """Both sides reached their end (terminal status on each)."""
        ms, inc = self.src.migration, self.dst.incoming
        assert inc is not None
        await self.src.wait_for(lambda: ms.status in (M.COMPLETED, M.FAILED, M.CANCELLED)
                                and inc.status in ("completed", "failed"), timeout)
        await ms.wait_done(10)

    def close(self) -> None:
        for ch in self._keep:
            try:
                ch.close()
            except OSError:
                pass


@pytest.fixture
async def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    src = Harness(loop, memory=MEM)
    src.migration.config.set_capabilities([("events", True)])
    src.migration.config.set_parameters({"max-bandwidth": 0, "x-migd-peer-timeout": TIMEOUT})
    src.machine.start()
    dst = DestHarness(loop)
    p = Pair(src, dst, tmp_path / "mig.sock", monkeypatch)
    yield p
    p.close()
    await asyncio.get_running_loop().run_in_executor(None, dst.close)
    src.close()


def src_running(p: Pair) -> bool:
    return p.src.runstate.state is RunState.RUNNING


async def test_clean_migration_commits(pair: Pair) -> None:
    await pair.start()
    await pair.settle()
    ms, inc = pair.src.migration, pair.dst.incoming
    assert inc is not None
    assert ms.status is M.COMPLETED and inc.status == "completed", (ms.query(), inc.query())
    assert ms.committed and inc.features == 31  # commit, heartbeat, checksum, page runs, load pace
    assert pair.dst.running and not src_running(pair)
    assert pair.src.runstate.state is RunState.POSTMIGRATE
    phases = ms.query()["x-migd-downtime-phases"]
    assert {"wait-ack", "commit"} <= set(phases)


# (side, message, action, when) -> who runs afterwards: "src", "dst", or "none" (the side that
# could run was the one that died, or neither can know: both stay paused and say why). "src|none":
# the destination died right after LOADED; if the COMMIT was already in its socket when it died, the
# source cannot know whether it ran and stays paused (a double fault only an operator can settle).
CASES = [
    ("dst", "LOADED", "cut", "before", "src"),
    ("dst", "LOADED", "cut", "after", "dst"),
    ("dst", "LOADED", "kill", "before", "src"),
    ("dst", "LOADED", "kill", "after", "src|none"),
    ("src", "COMMIT", "cut", "before", "src"),
    ("src", "COMMIT", "cut", "after", "dst"),
    # here the source outlives its dead channel: not one byte of COMMIT left, so it resumes (a really
    # killed source runs nothing; what matters is that the destination does not run either)
    ("src", "COMMIT", "kill", "before", "src"),
    ("src", "COMMIT", "kill", "after", "dst"),
    ("dst", "SHUT", "cut", "before", "dst"),
    ("dst", "SHUT", "cut", "after", "dst"),
    ("dst", "SHUT", "kill", "before", "dst"),
    ("dst", "SHUT", "kill", "after", "dst"),
]
MATCH = {"LOADED": is_loaded, "COMMIT": is_commit, "SHUT": is_shut}


@pytest.mark.parametrize(("side", "message", "action", "when", "runs"), CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[1]}" for c in CASES])
async def test_fault_at_each_switchover_message(pair: Pair, side: str, message: str, action: str,
                                                 when: str, runs: str) -> None:
    pair.fault(side, MATCH[message], action, when)
    await pair.start()
    await pair.settle()
    fault = pair.src_fault if side == "src" else pair.dst_fault
    assert fault is not None and fault.tripped.is_set(), ("the fault point was never reached", pair.src.migration.query())
    ms, inc = pair.src.migration, pair.dst.incoming
    assert inc is not None
    src_info, dst_info = ms.query(), inc.query()
    assert not (src_running(pair) and pair.dst.running), (src_info, dst_info)
    outcome = "src" if src_running(pair) else "dst" if pair.dst.running else "none"
    assert outcome in runs.split("|"), (outcome, src_info, dst_info)
    if outcome == "src":
        assert ms.status is M.FAILED and inc.status == "failed"
    elif outcome == "dst":
        assert inc.status == "completed"
        if ms.status is not M.COMPLETED:  # the SHUT was lost: committed, paused, and it says so
            assert ms.status is M.FAILED and "committed" in src_info["error-desc"], src_info
            assert pair.src.runstate.state is RunState.POSTMIGRATE
    else:
        assert inc.status == "failed", dst_info
        if side == "dst":  # the source lives on, paused, and says why
            assert ms.status is M.FAILED and "committed" in src_info["error-desc"], src_info
    if inc.status == "failed" and "COMMIT did not arrive" in dst_info["error-desc"]:
        assert pair.dst.exits == []  # a held destination keeps its loaded guest: no exit
    elif inc.status == "failed":  # the exit follows the published status (incoming thread)
        await pair.src.wait_for(lambda: pair.dst.exits == [1], 10)


async def test_cancel_during_device_never_runs_both(pair: Pair) -> None:
    """The known split brain: migrate_cancel while the source waits in `device`, destination without -S.

    The destination's LOADED is held back so the cancel surely lands in `device` before the commit.
    """
    pair.fault("dst", is_loaded, "cut", "before")  # LOADED never arrives: the source waits in device
    await pair.start()
    await pair.src.wait_status(M.DEVICE, timeout=30)
    await pair.src.wait_for(lambda: pair.dst_fault is not None and pair.dst_fault.tripped.is_set(), 30)
    await pair.src.migration.cancel()
    await pair.settle()
    assert pair.src.migration.status is M.CANCELLED
    assert src_running(pair) and not pair.dst.running
    assert pair.dst.incoming is not None and pair.dst.incoming.status == "failed"


async def cancel_race_once(tmp: Path, i: int, loaded_delay: float,
                           monkeypatch: pytest.MonkeyPatch) -> tuple[bool, bool, str, str]:
    """One migration; migrate_cancel as soon as the source is in `device`, while the destination's
    LOADED is ``loaded_delay`` s late: the cancel lands before or after the commit. Who runs?"""
    loop = asyncio.get_running_loop()
    src = Harness(loop, memory=1 << 20)
    src.migration.config.set_parameters({"max-bandwidth": 0, "x-migd-peer-timeout": TIMEOUT})
    src.machine.start()
    dst = DestHarness(loop, memory=1 << 20)
    p = Pair(src, dst, tmp / f"race{i}.sock", monkeypatch)
    p.fault("dst", is_loaded, "delay", "before", loaded_delay)
    try:
        await p.start()
        ms = src.migration
        await src.wait_for(lambda: ms.status in (M.DEVICE, M.COMPLETED, M.FAILED), 30)
        try:
            await ms.cancel()
        except MigrationError as exc:
            assert "committed" in str(exc)
        await p.settle()
        inc = dst.incoming
        assert inc is not None
        return (src.runstate.state is RunState.RUNNING, dst.running, str(ms.status), inc.status)
    finally:
        monkeypatch.undo()
        p.close()
        await loop.run_in_executor(None, dst.close)
        src.close()


async def test_cancel_during_device_50_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The split brain of issue 11, repeated: exactly one side runs every time, whoever won."""
    outcomes = []
    for i in range(50):
        src_runs, dst_runs, src_status, dst_status = await cancel_race_once(
            tmp_path, i, (i % 10) * 0.002, monkeypatch)
        assert src_runs != dst_runs, (i, src_runs, dst_runs, src_status, dst_status)
        if src_runs:
            assert (src_status, dst_status) == ("cancelled", "failed"), (i, src_status, dst_status)
        outcomes.append("src" if src_runs else "dst")
    print("cancel race outcomes:", {k: outcomes.count(k) for k in ("src", "dst")})
    assert "src" in outcomes  # the cancel did land before the commit in some rounds


async def test_cancel_after_commit_is_refused(pair: Pair) -> None:
    """Past the point of no return migrate_cancel answers an error and changes nothing."""
    pair.fault("dst", is_shut, "cut", "before")  # the SHUT never comes: the source waits committed
    await pair.start()
    ms = pair.src.migration
    await pair.src.wait_for(lambda: ms.committed, 30)
    with pytest.raises(MigrationError, match="committed"):
        await ms.cancel()
    assert ms.status is M.DEVICE
    await pair.settle()
    assert ms.query()["status"] == "failed" and pair.dst.running and not src_running(pair)
    assert "committed" in ms.query()["error-desc"]
    # the operator, who knows the destination runs, may not migrate again from here
    with pytest.raises(MigrationError, match="previous migration"):
        await ms.start(f"unix:{pair.path}.2")


async def test_pre_switchover_longer_than_the_peer_timeout_heartbeats_keep_it(pair: Pair) -> None:
    """Paused in pre-switchover for more than twice the peer timeout: the source's heartbeats keep the
    destination waiting, and migrate-continue then completes."""
    ms = pair.src.migration
    ms.config.set_capabilities([("pause-before-switchover", True)])
    await pair.start()
    await pair.src.wait_status(M.PRE_SWITCHOVER, timeout=30)
    thread = ms.thread
    assert thread is not None and thread._beat is not None
    beat = thread._beat
    start = beat.sent
    await pair.src.wait_for(lambda: beat.sent - start >= 9, 30)  # >= 9 x 0.25 s = 2.25 s > 2 x TIMEOUT
    inc = pair.dst.incoming
    assert inc is not None and inc.status == "active"
    assert inc.query()["x-migd-peer-silent-ms"] < TIMEOUT * 1000
    assert ms.query()["x-migd-peer-silent-ms"] < TIMEOUT * 1000
    ms.continue_("pre-switchover")
    await pair.settle()
    assert ms.status is M.COMPLETED and pair.dst.running


async def test_destination_silent_in_pre_switchover_fails_and_resumes(pair: Pair) -> None:
    """QEMU notices a dead destination in pre-switchover only at migrate-continue; migd within the
    peer timeout, and the guest runs again."""
    ms = pair.src.migration
    ms.config.set_capabilities([("pause-before-switchover", True)])

    def heartbeat_in_pre_switchover(data: bytes) -> bool:
        return data[:2] == b"\x4d\x02" and ms.status is M.PRE_SWITCHOVER

    pair.fault("dst", heartbeat_in_pre_switchover, "cut", "before")
    await pair.start()
    await pair.settle()
    assert ms.status is M.FAILED and src_running(pair) and not pair.dst.running
    desc = ms.query()["error-desc"]
    assert re.fullmatch(r"The destination has been silent for \d+\.\d s \(x-migd-peer-timeout is 1 s\)", desc), desc
    assert "pre-switchover" in pair.src.statuses()


async def test_flipped_bit_in_transit_fails_the_load_and_the_source_resumes(pair: Pair) -> None:
    """Item 3 of issue 11: a page corrupted on the wire is refused with the block and offset named."""
    block = pair.src.machine.ram.blocks()[0]
    block.pages[:] = 7  # every page goes out as data
    pair.fault("src", lambda data: False, "flip", "before")
    await pair.start()
    await pair.settle()
    ms, inc = pair.src.migration, pair.dst.incoming
    assert inc is not None and pair.src_fault is not None and pair.src_fault.tripped.is_set()
    assert inc.status == "failed" and not pair.dst.running
    desc = inc.query()["error-desc"]
    assert desc.startswith("load of migration failed: Checksum mismatch in the migration stream at offset "), desc
    assert "RAM block 'ram0'" in desc, desc
    assert ms.status is M.FAILED and ms.query()["error-desc"] == "Sibling indicated error 1"
    assert src_running(pair)


async def test_destination_gone_in_pre_switchover_is_noticed_at_once(pair: Pair) -> None:
    """A return path that closes while the source waits for migrate-continue fails the migration then
    (QEMU only notices at migrate-continue or migrate_cancel); the guest runs again."""
    ms = pair.src.migration
    ms.config.set_capabilities([("pause-before-switchover", True)])
    await pair.start()
    await pair.src.wait_status(M.PRE_SWITCHOVER, timeout=30)
    inc = pair.dst.incoming
    assert inc is not None and inc._channel is not None
    inc._channel.shutdown()  # the destination's end of the connection goes away
    await pair.src.wait_status(M.FAILED, timeout=10)
    await ms.wait_done(10)
    assert src_running(pair) and not pair.dst.running
    # the closed return path itself, not the silence timeout, ended it
    assert ms.query()["error-desc"].startswith("Return path"), ms.query()


async def test_lost_acknowledgement_50_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other split brain of issue 11, repeated: everything the destination sends from LOADED (or from
    SHUT) on is dropped. Whichever was lost, exactly one side runs; ten migrations at a time."""
    faults: dict[str, FaultChannel] = {}
    real_connect, real_listen = transports.connect, incoming_mod.listen  # type: ignore[attr-defined]

    def listen(uri: Any, fds: Any = None) -> Any:
        listener = real_listen(uri, fds)
        real_accept = listener.accept
        path = str(uri.path)
        match = is_loaded if path.endswith("-loaded.sock") else is_shut

        def accept() -> Channel:
            inner = real_accept()
            assert isinstance(inner, SocketChannel)
            faults[path] = FaultChannel(inner, match, "cut", "before")
            return faults[path]

        setattr(listener, "accept", accept)  # noqa: B010 - a real listener, its accept wrapped
        return listener

    monkeypatch.setattr(incoming_mod, "listen", listen)
    loop = asyncio.get_running_loop()

    async def one(i: int) -> tuple[str, str, str, str]:
        src = Harness(loop, memory=1 << 20)
        src.migration.config.set_parameters({"max-bandwidth": 0, "x-migd-peer-timeout": TIMEOUT})
        src.machine.start()
        dst = DestHarness(loop, memory=1 << 20)
        path = tmp_path / f"lost{i}-{'loaded' if i % 2 else 'shut'}.sock"
        try:
            dst.incoming = IncomingMigration(dst, f"unix:{path}", dst.migration.config)
            await dst.incoming.start()
            ms, inc = src.migration, dst.incoming
            await ms.start(f"unix:{path}")
            await src.wait_for(lambda: ms.status in (M.COMPLETED, M.FAILED, M.CANCELLED)
                               and inc.status in ("completed", "failed"), 60)
            await ms.wait_done(10)
            assert faults[str(path)].tripped.is_set()
            runs = {src.runstate.state is RunState.RUNNING: "src", dst.running: "dst"}
            return (runs.get(True, "none"), "both" if src.runstate.state is RunState.RUNNING and dst.running
                    else "one", str(ms.status), inc.status)
        finally:
            fault = faults.get(str(path))
            if fault is not None:
                fault.inner.close()
            await loop.run_in_executor(None, dst.close)
            src.close()

    results = []
    for batch in range(5):
        results += await asyncio.gather(*(one(batch * 10 + k) for k in range(10)))
    assert real_connect is transports.connect
    for i, (who, count, src_status, dst_status) in enumerate(results):
        assert count == "one" and who != "none", (i, who, src_status, dst_status)
        expected = "src" if i % 2 else "dst"  # LOADED lost: the source resumes; SHUT lost: the destination has it
        assert who == expected, (i, who, src_status, dst_status)
