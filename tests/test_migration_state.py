"""MigrationState: CAS transitions, events, migrate refusals and connect failures, query-migrate shapes.

The daemon here is a small harness of real parts (event loop, EventSink, RunStateMachine, Machine);
connections are real sockets, processes and descriptors.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import pytest
from migration_harness import Harness

from migd.machine.runstate import RunState
from migd.migration.incoming import IncomingMigration
from migd.migration.info import query_migrate
from migd.migration.state import MigrationError
from migd.migration.status import MigrationStatus as M


@pytest.fixture
async def harness():
    h = Harness(asyncio.get_running_loop())
    h.migration.config.set_capabilities([("events", True)])
    yield h
    h.close()


def test_cas_transition_only_from_expected_state_and_event_only_on_success() -> None:
    h = Harness(asyncio.new_event_loop())
    try:
        ms = h.migration
        assert ms.set_state(M.NONE, M.SETUP) is True
        assert ms.set_state(M.NONE, M.ACTIVE) is False  # lost the race: nothing happens
        assert ms.status is M.SETUP
        assert h.seen == []  # the events capability is off by default
        ms.config.set_capabilities([("events", True)])
        assert ms.set_state((M.SETUP, M.ACTIVE), M.ACTIVE)
        assert ms.set_state(M.SETUP, M.FAILED) is False
        assert h.statuses() == ["active"]
        assert ms.is_running()
        assert ms.fail("boom") and ms.status is M.FAILED and ms.error_desc == "boom"
        assert not ms.is_running()
    finally:
        h.close()


def test_fail_does_not_override_a_cancel() -> None:
    h = Harness(asyncio.new_event_loop())
    try:
        ms = h.migration
        ms.set_state(M.NONE, M.CANCELLING)
        assert ms.fail("write error") is False
        assert ms.status is M.CANCELLING
    finally:
        h.close()


def _on_migration_thread(fn: Callable[[], None]) -> None:
    """Sync hooks run on the migration thread (their marker checks it): run ``fn`` on one."""
    thread = threading.Thread(target=fn, name="mig/src/main")
    thread.start()
    thread.join(10)


def test_migration_pass_event_on_every_sync(harness: Harness) -> None:
    ms = harness.migration
    ms._reset("unix:/x")

    def syncs() -> None:
        for n in (1, 2):
            ms.stats.dirty_sync_count = n
            for hook in ms.stats.on_sync:
                hook(ms.stats)

    _on_migration_thread(syncs)
    harness.events.deliver()  # the loop is not running in this test: deliver what was queued
    passes = [e["data"]["pass"] for e in harness.seen if e["event"] == "MIGRATION_PASS"]
    assert passes == [1, 2]
    ms.config.set_capabilities([("events", False)])
    _on_migration_thread(lambda: [hook(ms.stats) for hook in ms.stats.on_sync] and None)
    harness.events.deliver()
    assert len([e for e in harness.seen if e["event"] == "MIGRATION_PASS"]) == 2


def test_query_none_is_empty_or_the_incoming_side() -> None:
    """query-migrate (migration/info.py) picks the side: the destination's while the source never ran."""
    h = Harness(asyncio.new_event_loop())
    try:
        assert h.migration.query() == {}
        assert query_migrate(h.migration, None) == {}
        incoming = IncomingMigration(h, "defer", h.config)
        assert query_migrate(h.migration, incoming) == {}  # nothing happened on either side
        incoming.status = M.ACTIVE
        incoming.socket_address = []
        assert query_migrate(h.migration, incoming) == {"status": "active"}
        incoming.socket_address = [{"type": "unix", "path": "/x"}]
        assert query_migrate(h.migration, incoming) == {
            "status": "active", "socket-address": [{"type": "unix", "path": "/x"}]}
        assert h.migration.set_state(M.NONE, M.SETUP)
        assert query_migrate(h.migration, incoming) == {"status": "setup"}  # the source wins
    finally:
        h.close()


async def test_refusals_in_qemu_order(harness: Harness) -> None:
    ms = harness.migration
    cases = [
        ({"uri": "foo:bar"}, "unknown migration protocol: foo:bar"),
        ({}, "need either 'uri' or 'channels' argument"),
        ({"uri": "unix:/x", "channels": []}, "need either 'uri' or 'channels' argument"),
        ({"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix",
                                                          "path": "/x"}}], "resume": True},
         "Cannot resume if there is no paused migration"),
    ]
    for kwargs, text in cases:
        with pytest.raises(MigrationError) as err:
            await ms.start(**kwargs)
        assert str(err.value) == text
    harness.runstate.set(RunState.PAUSED)
    harness.runstate.set(RunState.PRELAUNCH)
    harness.runstate.set(RunState.INMIGRATE)
    with pytest.raises(MigrationError, match="^Guest is waiting for an incoming migration$"):
        await ms.start("unix:/nonexistent")
    harness.runstate.set(RunState.POSTMIGRATE)
    with pytest.raises(MigrationError,
                       match="^Can't migrate the vm that was paused due to previous migration$"):
        await ms.start("unix:/nonexistent")
    # a bad protocol is reported before the run state (QEMU parses the URI first)
    with pytest.raises(MigrationError, match="^unknown migration protocol: x:y$"):
        await ms.start("x:y")
    assert ms.status is M.NONE and harness.seen == []  # refusals change nothing


async def test_connect_failure_goes_setup_then_failed_with_error_desc(harness: Harness, tmp_path) -> None:
    ms = harness.migration
    path = tmp_path / "nobody.sock"
    await ms.start(f"unix:{path}")
    assert harness.statuses() == ["setup"]  # before the reply, like QEMU
    assert ms.query() == {"status": "setup"}
    await harness.wait_status(M.FAILED)
    await ms.wait_done(5)
    info = ms.query()
    assert info["status"] == "failed"
    assert str(path) in info["error-desc"] and "No such file or directory" in info["error-desc"]
    assert set(info) == {"status", "error-desc"}
    assert harness.statuses() == ["setup", "failed"]
    assert harness.runstate.state is RunState.RUNNING
    # refused connection over tcp: a real closed port
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    await ms.start(f"tcp:127.0.0.1:{port}")
    await harness.wait_status(M.FAILED)
    assert "Connection refused" in ms.query()["error-desc"]


async def test_unknown_fd_fails_and_returns_the_error(harness: Harness) -> None:
    ms = harness.migration
    with pytest.raises(MigrationError) as err:
        await ms.start("fd:nosuchfd", fds={})
    assert str(err.value) == "File descriptor named 'nosuchfd' has not been found"
    assert harness.statuses() == ["setup", "failed"]
    assert ms.query() == {"status": "failed",
                          "error-desc": "File descriptor named 'nosuchfd' has not been found"}


async def test_continue_checks_the_current_state(harness: Harness) -> None:
    ms = harness.migration
    with pytest.raises(MigrationError, match="^Migration not in expected state: none$"):
        ms.continue_("pre-switchover")
    ms.set_state(M.NONE, M.PRE_SWITCHOVER)
    ms.continue_("pre-switchover")
    assert ms.continue_event.is_set()


async def test_cancel_without_migration_is_a_noop(harness: Harness) -> None:
    await harness.migration.cancel()
    assert harness.migration.status is M.NONE and harness.seen == []


async def test_cancel_refused_in_postcopy(harness: Harness) -> None:
    harness.migration.set_state(M.NONE, M.POSTCOPY_ACTIVE)
    with pytest.raises(MigrationError, match="^Postcopy migration in progress, cannot cancel.$"):
        await harness.migration.cancel()


async def test_parameters_and_capabilities_while_running(harness: Harness) -> None:
    ms = harness.migration
    ms.set_state(M.NONE, M.ACTIVE)
    from migd.migration.params import ParamError

    with pytest.raises(ParamError, match="^There's a migration process in progress$"):
        ms.set_capabilities([("events", False)])
    ms.set_parameters({"max-bandwidth": 1 << 20})  # parameters are allowed while running
    assert ms.config.param("max-bandwidth") == 1 << 20


async def test_exec_target_that_exits_fails_the_migration(harness: Harness) -> None:
    """exec:false: the connect succeeds, the first write fails -> failed, guest running."""
    pytest.importorskip("migd.migration.savevm")
    ms = harness.migration
    harness.machine.start()
    await ms.start("exec:false")
    await harness.wait_status(M.FAILED, timeout=20)
    await ms.wait_done(10)
    assert ms.query()["error-desc"]
    assert harness.runstate.state is RunState.RUNNING
    assert ms.thread is None


# -- over QMP, with real daemons --------------------------------------------------------------------

def test_qmp_migration_commands_end_to_end(migd_factory) -> None:
    """The QMP surface on real daemons: event before the reply, refusals, cancel, then a completion."""
    from helpers import RawQMP

    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=8M")
    dst = migd_factory("dst", "-m", "64M", "-S", "--incoming", f"unix:{src.sock_path('mig')}")
    assert src.cmd("query-migrate") == {}
    caps = src.cmd("query-migrate-capabilities")
    assert caps[0] == {"capability": "xbzrle", "state": False}
    assert {"capability": "return-path", "state": True} in caps
    assert src.cmd_error("migrate-set-capabilities",
                         capabilities=[{"capability": "xbzrle", "state": True}])["desc"] == \
        "Capability 'xbzrle' is not supported by migd"
    assert src.cmd("query-migrate-parameters")["max-bandwidth"] == 134217728
    assert src.cmd_error("migrate-start-postcopy")["desc"] == \
        "Enable postcopy with migrate_set_capability before the start of migration"
    assert src.cmd_error("migrate-pause")["desc"] == \
        "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
    assert src.cmd_error("migrate", uri="nope:x")["desc"] == "unknown migration protocol: nope:x"
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 20})  # slow: stays active

    # a first migration to a peer that only swallows bytes, cancelled while active
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer_path = src.sock_path("peer")
    peer.bind(str(peer_path))
    peer.listen(1)
    with RawQMP(src.qmp_path) as raw:
        raw.negotiate()
        raw.send({"execute": "migrate", "arguments": {"uri": f"unix:{peer_path}"}, "id": 1})
        first = raw.recv()
        assert first["event"] == "MIGRATION" and first["data"] == {"status": "setup"}  # before the reply
        assert raw.reply() == {"return": {}, "id": 1}
    conn, _ = peer.accept()
    src.wait_for(lambda: src.cmd("query-migrate")["status"] == "active", what="active")
    src.wait_for(lambda: "x-migd-convergence" in src.cmd("query-migrate"), what="a forecast")
    info = src.cmd("query-migrate")
    # QEMU's members, plus migd's convergence forecast while active (issue 10)
    assert {"status", "ram", "total-time", "expected-downtime", "setup-time", "x-migd-convergence"} == set(info)
    assert info["x-migd-convergence"]["state"] in ("converging", "stalled", "diverging")
    assert src.cmd_error("migrate", uri="unix:/x")["desc"] == "There's a migration process in progress"
    assert src.cmd_error("migrate-set-capabilities",
                         capabilities=[{"capability": "events", "state": False}])["desc"] == \
        "There's a migration process in progress"
    assert src.cmd("migrate_cancel") == {}
    assert src.cmd("query-migrate") == {"status": "cancelled"}
    assert src.status() == "running"
    conn.close()
    peer.close()

    # then a real one: completes, guest stopped for good, phases add up to the downtime
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"unix:{src.sock_path('mig')}")
    src.wait_for(lambda: src.cmd("query-migrate")["status"] in ("completed", "failed"), 60, "completion")
    info = src.cmd("query-migrate")
    assert info["status"] == "completed", info
    assert abs(sum(info["x-migd-downtime-phases"].values()) - info["downtime"]) <= 2
    assert isinstance(info["x-migd-expected-downtime"], int) and info["x-migd-expected-downtime"] > 0
    assert "expected-downtime" not in info  # QEMU's member is gone once completed
    assert src.status() == "postmigrate"
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", 30, "destination")
    assert src.cmd("x-migd-ram-digest") == dst.cmd("x-migd-ram-digest")
    assert src.cmd_error("migrate", uri="unix:/x")["desc"] == \
        "Can't migrate the vm that was paused due to previous migration"
