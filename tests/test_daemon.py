"""The daemon as a process: QMP life cycle through qemu.qmp, signals, sockets, sd_notify, run states."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
from pathlib import Path

import pytest
from helpers import Migd, wait_for
from qemu.qmp import QMPClient

pytestmark = pytest.mark.e2e


async def _next_event(client: QMPClient, name: str, timeout: float = 30) -> dict:
    async with asyncio.timeout(timeout):
        async for event in client.events:
            if event["event"] == name:
                return dict(event)
    raise AssertionError("event stream ended")


async def test_qmpclient_life_cycle(migd_factory) -> None:
    """The done-when path: negotiate, query-status, stop -> STOP, cont -> RESUME, quit -> SHUTDOWN, exit 0."""
    vm: Migd = migd_factory("vm", "-m", "32M", connect=False)
    client = QMPClient("test")
    await client.connect(str(vm.qmp_path))
    try:
        assert client.greeting is not None
        qemu_version = client.greeting.QMP.version["qemu"]
        assert set(qemu_version) == {"major", "minor", "micro"}
        assert client.greeting.QMP.version["package"].startswith("migd ")
        status = await client.execute("query-status")
        assert status == {"running": True, "singlestep": False, "status": "running"}

        assert await client.execute("stop") == {}
        stop = await _next_event(client, "STOP")
        assert set(stop["timestamp"]) == {"seconds", "microseconds"}
        assert (await client.execute("query-status"))["status"] == "paused"

        assert await client.execute("cont") == {}
        await _next_event(client, "RESUME")
        assert (await client.execute("query-status"))["running"] is True

        assert await client.execute("quit") == {}
        shutdown = await _next_event(client, "SHUTDOWN")
        assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    finally:
        # after quit the daemon hangs up, as QEMU does; disconnect() re-raises that EOF
        with contextlib.suppress(EOFError, ConnectionResetError):
            await client.disconnect()
    assert await asyncio.to_thread(vm.wait, 30) == 0
    assert not vm.qmp_path.exists()


def test_two_clients_both_get_events(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "32M")
    other = vm.client()
    vm.cmd("stop")
    vm.wait_event("STOP")
    assert other.pull_event(wait=30.0)["event"] == "STOP"
    other.cmd("cont")
    vm.wait_event("RESUME")
    assert other.pull_event(wait=30.0)["event"] == "RESUME"
    assert vm.quit() == 0


def test_sigterm_is_a_clean_shutdown(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "32M", "--qmp", "tcp:127.0.0.1:0")
    watcher = vm.client()
    vm.proc.send_signal(signal.SIGTERM)
    event = watcher.pull_event(wait=30.0)
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"guest": False, "reason": "host-signal"}
    assert vm.wait() == 0
    assert not vm.qmp_path.exists()
    vm.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_exit_zero(migd_factory, sig: signal.Signals) -> None:
    vm = migd_factory("vm", "-m", "32M")
    vm.proc.send_signal(sig)
    assert vm.wait() == 0
    assert not vm.qmp_path.exists()


def test_unix_socket_is_private(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "32M")
    mode = vm.qmp_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_run_states_from_options(migd_factory) -> None:
    paused = migd_factory("p", "-m", "32M", "-S")
    assert paused.cmd("query-status") == {"running": False, "singlestep": False, "status": "prelaunch"}
    paused.cmd("stop")  # not live: nothing to stop, and no STOP event
    assert paused.status() == "prelaunch"
    paused.cmd("cont")
    paused.wait_event("RESUME")
    assert paused.status() == "running"
    assert not [e for e in paused.events if e["event"] == "STOP"]


def test_cont_during_inmigrate_sets_autostart(migd_factory) -> None:
    """QEMU 10.0: cont while waiting for a migration only arranges to run once it lands."""
    vm = migd_factory("dst", "-m", "32M", "--incoming", "defer", "-S")
    assert vm.status() == "inmigrate"
    assert vm.cmd("cont") == {}
    assert vm.status() == "inmigrate"
    assert vm.cmd("stop") == {}
    assert vm.status() == "inmigrate"


def test_query_name_version_commands(migd_factory) -> None:
    vm = migd_factory("guest-one", "-m", "32M")
    assert vm.cmd("query-name") == {"name": "guest-one"}
    version = vm.cmd("query-version")
    assert version["package"].startswith("migd ")
    assert {"major", "minor", "micro"} == set(version["qemu"])
    names = {c["name"] for c in vm.cmd("query-commands")}
    assert {"qmp_capabilities", "query-status", "stop", "cont", "quit", "getfd", "closefd"} <= names


def test_several_listeners_and_tcp(migd_factory) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    with socket.socket() as probe:  # a free port (the daemon binds it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    second = Path(f"/tmp/migd-second-{os.getpid()}.sock")
    vm = migd_factory("vm", "-m", "32M", "--qmp", f"unix:{second}", "--qmp", f"tcp:127.0.0.1:{port}")
    clients = [QEMUMonitorProtocol(str(second)), QEMUMonitorProtocol(("127.0.0.1", port))]
    for q in clients:
        q.connect()
        assert q.cmd("query-name") == {"name": "vm"}
    vm.cmd("stop")
    for q in clients:  # events reach every listener's sessions
        assert q.pull_event(wait=30.0)["event"] == "STOP"
        q.close()
    assert vm.quit() == 0
    assert not second.exists()


def test_bad_listener_fails_cleanly(tmp_path: Path) -> None:
    """A QMP socket that cannot be bound: exit status 3 (a runtime failure) and one line, no traceback."""
    import subprocess
    import sys

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "migd", "-m", "32M", "--qmp", f"tcp:127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
    finally:
        blocker.close()
    assert proc.returncode == 3
    assert proc.stderr == f"migd: error: --qmp tcp:127.0.0.1:{port}: Address already in use\n"


def test_sd_notify(migd_factory, tmp_path: Path) -> None:
    """READY=1 once listening, STATUS= on run-state changes, STOPPING=1 at the end."""
    path = Path(os.path.join("/tmp", f"migd-notify-{os.getpid()}-{id(tmp_path)}.sock"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        vm = migd_factory("vm", "-m", "32M", env={"NOTIFY_SOCKET": str(path)})
        messages: list[str] = []

        def got(line: str) -> bool:
            sock.settimeout(0.2)
            try:
                messages.extend(sock.recv(4096).decode().split("\n"))
            except TimeoutError:
                pass
            return line in messages

        wait_for(lambda: got("READY=1"), 30, what="READY=1")
        assert "STATUS=running" in messages
        vm.cmd("stop")
        wait_for(lambda: got("STATUS=paused"), 30, what="STATUS=paused")
        assert vm.quit() == 0
        wait_for(lambda: got("STOPPING=1"), 30, what="STOPPING=1")
    finally:
        sock.close()
        path.unlink(missing_ok=True)


def test_abstract_notify_socket(monkeypatch) -> None:
    from migd import sdnotify

    name = f"migd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1", "STATUS=hello")
        assert sock.recv(100) == b"READY=1\nSTATUS=hello"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not sdnotify.notify("READY=1")
    finally:
        sock.close()


async def test_in_process_request_exit_without_shutdown_event(tmp_path: Path) -> None:
    """request_exit(1) from another thread: the daemon stops with status 1 and says no SHUTDOWN."""
    import threading

    from migd.config import build
    from migd.daemon import Daemon

    daemon = Daemon(build({"memory": "16M", "qmp": []}))
    await daemon.start()
    seen: list[dict] = []
    daemon.events.subscribe(seen.append)
    try:
        thread = threading.Thread(target=daemon.request_exit, args=(1,))
        thread.start()
        thread.join()
        await asyncio.wait_for(daemon.wait_stopped(), 30)
    finally:
        await daemon.stop()
    assert daemon.exit_code == 1
    assert not [e for e in seen if e["event"] == "SHUTDOWN"]


class _AsyncRaw:
    """A minimal asyncio QMP client for in-process daemons."""

    async def open(self, path: Path) -> _AsyncRaw:
        self.reader, self.writer = await asyncio.open_unix_connection(str(path))
        await self.reader.readline()
        assert await self.execute("qmp_capabilities") == {"return": {}}
        return self

    async def execute(self, name: str, **args) -> dict:
        import json

        self.writer.write(json.dumps({"execute": name, "arguments": args}).encode())
        while True:
            msg = json.loads(await asyncio.wait_for(self.reader.readline(), 30))
            if "event" not in msg:
                return msg

    def close(self) -> None:
        self.writer.close()


async def test_cont_refusals_follow_qemu(tmp_path: Path) -> None:
    from migd.bql import BQL
    from migd.config import build
    from migd.daemon import Daemon
    from migd.machine.runstate import RunState

    sock = Path(f"/tmp/migd-cont-{os.getpid()}.sock")
    daemon = Daemon(build({"memory": "16M", "qmp": [f"unix:{sock}"]}))
    await daemon.start()
    try:
        client = await _AsyncRaw().open(sock)
        with BQL:
            daemon.machine.vm_stop(RunState.FINISH_MIGRATE)
        reply = await client.execute("cont")
        assert reply == {"error": {"class": "GenericError", "desc": "Migration is not finalized yet"}}
        assert daemon.runstate.state is RunState.FINISH_MIGRATE
        daemon.runstate.set(RunState.POSTMIGRATE)
        assert await client.execute("cont") == {"return": {}}  # QEMU lets cont resume a migrated-away source
        assert daemon.runstate.state is RunState.RUNNING
        daemon.runstate.set(RunState.INTERNAL_ERROR)
        reply = await client.execute("cont")
        assert reply == {"error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}}
        assert daemon.runstate.state is RunState.INTERNAL_ERROR
        client.close()
    finally:
        await daemon.stop()


def test_quit_replies_then_announces_shutdown(migd_factory) -> None:
    from helpers import RawQMP

    vm = migd_factory("vm", "-m", "32M")
    with RawQMP(vm.qmp_path) as raw:
        raw.negotiate()
        raw.send({"execute": "quit", "id": "q"})
        assert raw.recv() == {"return": {}, "id": "q"}  # QEMU: the reply, then SHUTDOWN
        event = raw.recv()
        assert event["event"] == "SHUTDOWN" and event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert raw.sock.recv(1) == b""  # then the daemon hangs up
    assert vm.wait() == 0


def test_harness_maps_underscores_to_hyphens(migd_factory) -> None:
    vm = migd_factory("vm", "-m", "32M")
    vm.cmd("migrate-set-parameters", downtime_limit=123)
    vm.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    params = vm.cmd("query-migrate-parameters")
    assert params["downtime-limit"] == 123 and params["max-bandwidth"] == 0
    err = vm.cmd_error("migrate-set-parameters", downtime_limit="soon")
    assert err == {"class": "GenericError", "desc": "Invalid parameter type for 'downtime-limit', expected: integer"}


async def test_stop_waiting_for_the_big_lock_does_not_freeze_qmp(tmp_path: Path) -> None:
    """While another thread holds the BQL (a switch-over), `stop` waits, and other clients are served."""
    import threading

    from migd.bql import BQL
    from migd.config import build
    from migd.daemon import Daemon

    sock = Path(f"/tmp/migd-bql-{os.getpid()}.sock")
    daemon = Daemon(build({"memory": "16M", "qmp": [f"unix:{sock}"]}))
    await daemon.start()
    held, release = threading.Event(), threading.Event()

    def switch_over() -> None:
        with BQL:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=switch_over)
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 30)
        a = await _AsyncRaw().open(sock)
        b = await _AsyncRaw().open(sock)
        stopping = asyncio.create_task(a.execute("stop"))
        for _ in range(5):
            reply = await b.execute("query-status")  # answered although `stop` is blocked
            assert reply["return"]["status"] == "running"
        assert not stopping.done()
        release.set()
        assert await asyncio.wait_for(stopping, 30) == {"return": {}}
        assert (await b.execute("query-status"))["return"]["status"] == "paused"
        a.close()
        b.close()
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 30)
        await daemon.stop()


async def test_a_hanging_part_does_not_block_shutdown(monkeypatch) -> None:
    """machine.shutdown() that never returns: stop() gives up after the step timeout and goes on."""
    import threading

    from migd import daemon as daemon_mod
    from migd.config import build
    from migd.daemon import Daemon

    monkeypatch.setattr(daemon_mod, "STOP_STEP_TIMEOUT", 0.5)
    daemon = Daemon(build({"memory": "16M", "qmp": []}))
    await daemon.start()
    never = threading.Event()
    real_shutdown = daemon.machine.shutdown
    monkeypatch.setattr(daemon.machine, "shutdown", lambda: never.wait(60))
    try:
        await asyncio.wait_for(daemon.stop(), 30)
    finally:
        never.set()
        real_shutdown()


def test_cont_while_running_is_a_no_op_without_resume(migd_factory) -> None:
    from helpers import RawQMP

    vm = migd_factory("vm", "-m", "32M")
    with RawQMP(vm.qmp_path) as raw:
        raw.negotiate()
        assert raw.execute("cont", id=1) == {"return": {}, "id": 1}
        assert raw.execute("query-status", id=2)["id"] == 2  # no RESUME came in between
        raw.send({"execute": "stop", "id": 3})
        assert raw.recv()["event"] == "STOP"  # QEMU order: the event, then the reply
        assert raw.recv() == {"return": {}, "id": 3}
        raw.send({"execute": "cont", "id": 4})
        assert raw.recv()["event"] == "RESUME"
        assert raw.recv() == {"return": {}, "id": 4}
