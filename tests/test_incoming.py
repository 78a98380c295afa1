"""The destination side through real daemons: migrate-incoming's refusals and shape, bad streams,
the return path on failure, exit-on-error, and the order of events on success."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2e_util import poll, query, wait_status  # noqa: E402

from migd.migration.format import FEATURES_SUPPORTED, config_subsection  # noqa: E402

MAGIC = 0x5145564D


def header(machine: bytes = b"migd") -> bytes:
    """A valid stream start: magic, version 3, the configuration section."""
    return struct.pack(">IIBI", MAGIC, 3, 0x07, len(machine)) + machine


def command(cmd: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BHH", 0x08, cmd, len(payload)) + payload


def events_on(vm) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])


def connect_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def qmp_error(vm, name: str, arguments: dict) -> dict[str, str]:
    reply = vm.cmd_raw(name, arguments)
    assert "error" in reply, reply
    return reply["error"]


def test_refused_without_incoming(migd_factory) -> None:
    vm = migd_factory("plain", "-m", "16M")
    err = qmp_error(vm, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    assert err == {"class": "GenericError", "desc": "'-incoming' was not specified on the command line"}
    assert query(vm) == {}


def test_defer_refusals_change_nothing(migd_factory, tmp_path: Path) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    assert query(vm) == {}
    assert vm.status() == "inmigrate"
    cases = [
        ({"uri": "foo:bar"}, "unknown migration protocol: foo:bar"),
        ({}, "need either 'uri' or 'channels' argument"),
        ({"uri": "tcp:127.0.0.1:0", "channels": []}, "need either 'uri' or 'channels' argument"),
        ({"channels": [{"channel-type": "main", "addr": {"transport": "exec", "args": ["true"]}}] * 2},
         "Channel list has more than one entries"),
        ({"uri": f"file:{tmp_path}/missing"}, f"Unable to open {tmp_path}/missing: No such file or directory"),
        ({"uri": "fd:nosuchfd"}, "File descriptor named 'nosuchfd' has not been found"),
        ({"uri": "tcp:127.0.0.1"}, "error parsing address '127.0.0.1'"),
    ]
    for args, desc in cases:
        reply = vm.cmd_raw("migrate-incoming", args)
        assert reply["error"] == {"class": "GenericError", "desc": desc}, args
        assert query(vm) == {}  # nothing changed: a corrected call may follow
    reply = vm.cmd_raw("migrate-incoming", {"uri": "unix:/x", "exit_on_error": False})
    assert reply["error"]["desc"] == "Parameter 'exit_on_error' is unexpected"


def test_tcp_port_zero_setup_shape_and_once_only(migd_factory) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    events_on(vm)
    vm.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", exit_on_error=False)
    assert vm.wait_event("MIGRATION")["data"] == {"status": "setup"}
    info = query(vm)
    assert info["status"] == "setup"
    (addr,) = info["socket-address"]
    assert addr["type"] == "inet" and addr["host"] == "127.0.0.1"
    assert isinstance(addr["port"], str) and int(addr["port"]) > 0
    with socket.create_connection(("127.0.0.1", int(addr["port"])), timeout=10):
        pass  # it really listens there
    err = qmp_error(vm, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    assert err["desc"] == "The incoming migration has already been started"


def test_channels_form_unix(migd_factory) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    path = str(vm.sock_path("mig"))
    vm.cmd("migrate-incoming", channels=[
        {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": path}}])
    assert query(vm) == {"status": "setup", "socket-address": [{"type": "unix", "path": path}]}
    assert os.path.exists(path)


def test_wrong_magic_fails_and_guest_never_runs(migd_factory) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    events_on(vm)
    path = vm.sock_path("mig")
    vm.cmd("migrate-incoming", uri=f"unix:{path}", exit_on_error=False)
    with connect_unix(path) as s:
        s.sendall(b"NOPE" + b"\0" * 64)
        info = wait_status(vm, "failed", 30)
    assert info == {"status": "failed", "error-desc": "load of migration failed: Not a migration stream"}
    assert [e["data"]["status"] for e in (vm.wait_event("MIGRATION") for _ in range(3))] == [
        "setup", "active", "failed"]
    status = vm.cmd("query-status")
    assert status["status"] == "inmigrate" and status["running"] is False
    assert not path.exists()  # the listener (and its socket file) went with the accept


def test_ping_gets_pong_and_failure_sends_shut_1(migd_factory) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    path = vm.sock_path("mig")
    vm.cmd("migrate-incoming", uri=f"unix:{path}", exit_on_error=False)
    with connect_unix(path) as s:
        s.sendall(header() + command(1) + command(2, struct.pack(">I", 0x1234)))
        assert recv_exact(s, 8) == struct.pack(">HHI", 2, 4, 0x1234)  # PONG
        s.sendall(b"\x42")  # no such section type
        assert recv_exact(s, 8) == struct.pack(">HHI", 1, 4, 1)  # SHUT(1): the load failed
        assert recv_exact(s, 1) == b""  # and the destination closed the channel
    info = wait_status(vm, "failed", 30)
    assert "Unknown savevm section type 66" in info["error-desc"]
    assert vm.status() == "inmigrate"


def test_a_pong_that_cannot_be_sent_leaves_the_stream_to_say_how_it_ended(migd_factory) -> None:
    """A source killed mid-stream stops reading first: the PONG the destination writes then fails
    (EPIPE), yet the failure is the stream's end, as from any killed source, not that write's errno."""
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    path = vm.sock_path("mig")
    vm.cmd("migrate-incoming", uri=f"unix:{path}", exit_on_error=False)
    with connect_unix(path) as s:
        s.sendall(header() + command(1))  # OPEN_RETURN_PATH
        s.shutdown(socket.SHUT_RD)  # from now on every write of the destination fails with EPIPE
        s.sendall(command(2, struct.pack(">I", 7)))  # PING
        s.shutdown(socket.SHUT_WR)  # and the stream ends there
        info = wait_status(vm, "failed", 30)
    assert info["error-desc"].startswith("load of migration failed: Migration stream truncated"), info
    assert "PONG 7 not sent" in vm.log()
    assert vm.status() == "inmigrate"


def test_features_that_cannot_be_sent_leave_the_stream_to_say_how_it_ended(migd_factory) -> None:
    """The same for the answer to a migd source's announced features (killed just as it opened the
    return path): FEATURES fails with EPIPE, the failure is still the stream's end."""
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    path = vm.sock_path("mig")
    vm.cmd("migrate-incoming", uri=f"unix:{path}", exit_on_error=False)
    with connect_unix(path) as s:
        s.sendall(header() + config_subsection(FEATURES_SUPPORTED, 10_000))
        s.shutdown(socket.SHUT_RD)
        s.sendall(command(1))  # OPEN_RETURN_PATH: the destination answers with FEATURES
        s.shutdown(socket.SHUT_WR)
        info = wait_status(vm, "failed", 30)
    assert info["error-desc"].startswith("load of migration failed: Migration stream truncated"), info
    assert "FEATURES not sent" in vm.log()
    assert vm.status() == "inmigrate"


def test_no_return_path_without_open_command(migd_factory) -> None:
    """A stream that did not ask for a return path gets no SHUT (QEMU: the source did not open one)."""
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    path = vm.sock_path("mig")
    vm.cmd("migrate-incoming", uri=f"unix:{path}", exit_on_error=False)
    with connect_unix(path) as s:
        s.sendall(header() + b"\x42")
        assert recv_exact(s, 1) == b""
    wait_status(vm, "failed", 30)


def test_exit_on_error_default_exits_with_status_1(migd_factory, tmp_path: Path) -> None:
    bad = tmp_path / "bad.state"
    bad.write_bytes(header() + b"\x01\x00\x00")  # a section cut short
    vm = migd_factory("dst", "-m", "16M", "--incoming", f"file:{bad}", connect=False)
    assert vm.wait(30) == 1
    assert "truncated" in vm.log()


def test_success_order_of_events_and_running(migd_factory, tmp_path: Path) -> None:
    """QEMU: the guest starts (RESUME) before the status becomes completed."""
    src = migd_factory("src", "-m", "32M", "--workload", "counter")
    state = tmp_path / "saved"
    src.cmd("migrate", uri=f"file:{state}")
    wait_status(src, "completed", 60)
    vm = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    events_on(vm)
    vm.cmd("migrate-incoming", uri=f"file:{state}")
    wait_status(vm, "completed", 60)
    order = [e["event"] + ":" + e.get("data", {}).get("status", "") for e in vm.events]
    order += [e["event"] + ":" + e.get("data", {}).get("status", "")
              for e in (vm.qmp.pull_event(wait=1.0) for _ in range(4)) if e]
    assert order[:4] == ["MIGRATION:setup", "MIGRATION:active", "RESUME:", "MIGRATION:completed"], order
    assert vm.status() == "running"
    assert query(vm) == {"status": "completed"}
    # the counter guest picked up where the saved one stopped and keeps counting
    poll(lambda: all(v["counter"] > 0 for v in vm.cmd("x-migd-query-workload")["vcpus"]), 30, "counting")


def test_quit_while_waiting_cleans_up(migd_factory) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    path = vm.sock_path("mig")
    vm.cmd("migrate-incoming", uri=f"unix:{path}")
    assert path.exists()
    assert vm.quit() == 0
    assert not path.exists()


@pytest.mark.parametrize("exec_uri", ["exec:cat /dev/null"])
def test_exec_empty_stream_fails(migd_factory, exec_uri: str) -> None:
    vm = migd_factory("dst", "-m", "16M", "--incoming", "defer")
    vm.cmd("migrate-incoming", uri=exec_uri, exit_on_error=False)
    info = wait_status(vm, "failed", 30)
    assert "truncated" in info["error-desc"]


def test_migrate_incoming_after_command_line_uri_is_refused(migd_factory) -> None:
    """``--incoming URI`` already started the incoming side (QEMU runs migrate-incoming for it)."""
    vm = migd_factory("dst", "-m", "16M", "--incoming", "tcp:127.0.0.1:0")
    poll(lambda: query(vm).get("status") == "setup", 30, "the destination to listen")
    err = qmp_error(vm, "migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    assert err == {"class": "GenericError", "desc": "The incoming migration has already been started"}


def test_bad_incoming_uri_on_the_command_line_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "migd", "--qmp", f"unix:{tmp_path}/q.sock", "-m", "16M", "--incoming", "bogus:x"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2  # bad configuration
    assert "unknown migration protocol: bogus:x" in proc.stdout + proc.stderr
