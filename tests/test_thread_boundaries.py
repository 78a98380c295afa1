"""The cross-thread rules of issue 9, each provoked by controlling the interleaving.

- events reach clients in the order the status changes won, whichever thread emitted them;
- ``fail()`` records its error inside the status CAS, so a concurrent failure cannot erase it;
- a stream error is recorded once, under one lock, by the writer and by ``shutdown`` alike;
- ``migrate_cancel`` wakes a vCPU stop that waits inside the big lock;
- the thread markers refuse a call on the wrong thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType

import pytest
from migration_harness import Harness

from migd.machine.runstate import RunState
from migd.machine.vcpu import VCPU
from migd.migration.status import MigrationStatus as M
from migd.migration.stream import OutStream, StreamError
from migd.threads import CHECK, LoopHandle, ThreadViolation, loop_only, off_loop, on_thread
from migd.transports.channel import SocketChannel


class GateLock:
    """A lock that makes one chosen thread wait *before* it acquires, until the test opens the gate."""

    def __init__(self, inner: threading.Lock, held_back: Callable[[], bool]) -> None:
        self.inner = inner
        self.held_back = held_back
        self.arrived = threading.Event()
        self.gate = threading.Event()

    def __enter__(self) -> bool:
        if self.held_back():
            self.arrived.set()
            assert self.gate.wait(10)
        return self.inner.__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.inner.__exit__(kind, exc, tb)


def in_thread(fn: Callable[[], object], name: str = "worker") -> threading.Thread:
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


async def test_a_loop_event_never_overtakes_an_older_thread_event() -> None:
    """The migration thread's ``active`` is queued for the loop; a cancel on the loop right after must
    not be delivered first (a client saw ``cancelling`` before ``active``)."""
    h = Harness(asyncio.get_running_loop())
    try:
        ms = h.migration
        ms.config.set_capabilities([("events", True)])
        assert ms.set_state(M.NONE, M.SETUP)
        worker = in_thread(lambda: ms.set_state(M.SETUP, M.ACTIVE), "mig/src/main")
        worker.join(10)  # the loop has not run since: ``active`` waits in the queue
        assert h.statuses() == ["setup"]
        assert ms.set_state(M.ACTIVE, M.CANCELLING)  # on the loop: delivered at once, after ``active``
        assert h.statuses() == ["setup", "active", "cancelling"]
        await asyncio.sleep(0)
        assert h.statuses() == ["setup", "active", "cancelling"]  # and nothing twice
    finally:
        h.close()


async def test_events_from_many_threads_arrive_in_cas_order() -> None:
    h = Harness(asyncio.get_running_loop())
    try:
        ms = h.migration
        ms.config.set_capabilities([("events", True)])
        order = [M.SETUP, M.ACTIVE, M.DEVICE, M.COMPLETED]
        olds = [M.NONE, *order[:-1]]

        def chain(i: int) -> None:  # each thread waits for its predecessor's transition
            deadline = time.monotonic() + 10
            while not ms.set_state(olds[i], order[i]):
                assert time.monotonic() < deadline
                time.sleep(0.0005)

        threads = [in_thread(lambda i=i: chain(i), f"t{i}") for i in reversed(range(len(order)))]
        for t in threads:
            t.join(10)
        await h.wait_for(lambda: len(h.statuses()) == len(order))
        assert h.statuses() == [str(s) for s in order]
    finally:
        h.close()


async def test_a_concurrent_failure_cannot_erase_the_winners_error() -> None:
    """Thread A fails; before it takes the CAS lock, B fails and wins. The old fail() had already
    written A's text outside the lock and, losing, erased it: ``failed`` with no error-desc."""
    h = Harness(asyncio.get_running_loop())
    try:
        ms = h.migration
        assert ms.set_state(M.NONE, M.SETUP) and ms.set_state(M.SETUP, M.ACTIVE)
        gate = GateLock(ms._cas, lambda: threading.current_thread().name == "A")
        ms._cas = gate  # type: ignore[assignment]
        results: dict[str, bool] = {}
        a = in_thread(lambda: results.__setitem__("A", ms.fail("error of A")), "A")
        assert gate.arrived.wait(10)
        results["B"] = ms.fail("error of B")
        gate.gate.set()
        a.join(10)
        assert results == {"A": False, "B": True}
        assert ms.status is M.FAILED
        assert ms.error_desc == "error of B"
        assert ms.query()["error-desc"] == "error of B"
    finally:
        h.close()


async def test_a_failure_losing_to_a_cancel_leaves_no_error() -> None:
    h = Harness(asyncio.get_running_loop())
    try:
        ms = h.migration
        assert ms.set_state(M.NONE, M.SETUP) and ms.set_state(M.SETUP, M.ACTIVE)
        gate = GateLock(ms._cas, lambda: threading.current_thread().name == "A")
        ms._cas = gate  # type: ignore[assignment]
        a = in_thread(lambda: ms.fail("late error"), "A")
        assert gate.arrived.wait(10)
        assert ms.set_state(M.ACTIVE, M.CANCELLING)
        gate.gate.set()
        a.join(10)
        assert ms.status is M.CANCELLING and ms.error_desc is None
    finally:
        h.close()


class BlockingChannel(SocketChannel):
    """Its writes block until ``shutdown`` and then fail, like a peer that stopped reading."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.writing = threading.Event()
        self.released = threading.Event()

    def write_vectored(self, bufs: Sequence[memoryview]) -> int:
        self.writing.set()
        assert self.released.wait(10)
        raise BrokenPipeError(32, "Broken pipe")

    def shutdown(self) -> None:
        super().shutdown()
        self.released.set()


def test_a_write_failing_during_shutdown_reports_the_shutdown() -> None:
    """shutdown() records its reason, then wakes the blocked write, which fails: the writer must not
    replace the reason (both sides now set the error under one lock, first one wins)."""
    a, b = socket.socketpair()
    channel = BlockingChannel(a)
    stream = OutStream(channel)
    errors: list[str] = []

    def write() -> None:
        stream.put(b"x" * 100)
        try:
            stream.flush()
        except StreamError as exc:
            errors.append(exc.desc)

    writer = in_thread(write)
    assert channel.writing.wait(10)
    stream.shutdown()
    writer.join(10)
    assert errors == ["Channel was shut down"]
    assert stream.error == "Channel was shut down"
    b.close()
    channel.close()


def test_a_write_error_is_kept_by_a_later_shutdown() -> None:
    a, b = socket.socketpair()
    stream = OutStream(SocketChannel(a))
    b.close()
    stream.put(b"x" * (1 << 20))
    with pytest.raises(StreamError) as err:
        for _ in range(64):  # the peer is gone: a write fails within a few MiB
            stream.put(b"x" * (1 << 20))
            stream.flush()
    assert err.value.desc.startswith("Unable to write to channel")
    stream.shutdown()
    assert stream.error == err.value.desc
    stream.close()


async def test_cancel_wakes_a_vcpu_stop_waiting_in_the_big_lock(tmp_path) -> None:
    """A vCPU that never acknowledges the stop (stuck in its slice): migrate_cancel used to wait
    10 s and give up, leaving the migration thread inside the big lock."""
    h = Harness(asyncio.get_running_loop(), memory=8 << 20)
    release = threading.Event()
    stuck = threading.Event()

    def stuck_slice(vcpu: VCPU) -> None:  # stuck in its slice: it will not see the stop request
        stuck.set()
        release.wait(30)

    h.machine.vcpus.runner = stuck_slice
    h.machine.start()
    ms = h.migration
    ms.config.set_capabilities([("return-path", False)])
    ms.config.set_parameters({"max-bandwidth": 0})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "sink.sock")
    listener.bind(path)
    listener.listen(1)

    def sink() -> None:
        conn, _ = listener.accept()
        while conn.recv(1 << 20):
            pass
        conn.close()

    in_thread(sink)
    try:
        await h.wait_for(stuck.is_set, timeout=30)
        await ms.start(f"unix:{path}")
        await h.wait_for(lambda: h.runstate.state is RunState.FINISH_MIGRATE, timeout=30)
        assert ms.status is M.ACTIVE  # the thread waits for the vCPU inside vm_stop
        t0 = time.monotonic()
        await ms.cancel()
        assert time.monotonic() - t0 < 5  # well below the 10 s the cancel used to give up after
        assert ms.status is M.CANCELLED
        assert h.runstate.state is RunState.RUNNING  # the source's guest was resumed
        assert "STOP" in h.names() and h.names()[-1] == "RESUME"
    finally:
        release.set()
        listener.close()
        h.close()


@pytest.mark.skipif(not CHECK, reason="thread checks are off (MIGD_CHECK_THREADS=1 turns them on)")
async def test_markers_refuse_the_wrong_thread() -> None:
    @loop_only
    def on_loop_only() -> str:
        return "ok"

    @off_loop
    def blocking() -> str:
        return "ok"

    @on_thread("mig/src/main")
    def migration_only() -> str:
        return "ok"

    assert on_loop_only() == "ok"
    with pytest.raises(ThreadViolation):
        blocking()
    with pytest.raises(ThreadViolation):
        migration_only()
    outcome: list[object] = []

    def elsewhere() -> None:
        for fn in (on_loop_only, blocking):
            try:
                outcome.append(fn())
            except ThreadViolation as exc:
                outcome.append(type(exc))

    in_thread(elsewhere, "mig/src/main").join(10)
    assert outcome == [ThreadViolation, "ok"]
    done: list[str] = []
    in_thread(lambda: done.append(migration_only()), "mig/src/main").join(10)
    assert done == ["ok"]


async def test_loop_handle_keeps_fifo_order_across_threads() -> None:
    handle = LoopHandle(asyncio.get_running_loop())
    seen: list[int] = []
    handle.call_soon(seen.append, 1)
    in_thread(lambda: handle.call_soon(seen.append, 2)).join(10)
    handle.call_soon(seen.append, 3)
    await asyncio.sleep(0.05)
    assert seen == [1, 2, 3]
