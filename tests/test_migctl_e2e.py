"""migctl against a real migd process: every control subcommand, human and --json output, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from migd.migctl import main

REPO = Path(__file__).resolve().parent.parent


def migctl(sock: Path | str, *args: str, input: str | None = None, timeout: float = 60,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """migctl as the operator runs it: its own process."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120", **(env or {}))
    return subprocess.run([sys.executable, "-m", "migd.migctl", "-s", str(sock), *args], input=input,
                          capture_output=True, text=True, timeout=timeout, env=full_env)


def migctl_here(sock: Path | str, *args: str) -> subprocess.CompletedProcess[str]:
    """The same ``main()`` run in this process (saves an interpreter start per call)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["-s", str(sock), *args])
    return subprocess.CompletedProcess(["migctl", *args], code, out.getvalue(), err.getvalue())


def json_lines(out: str) -> list[Any]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def vm(migd_factory):
    return migd_factory("ctl", "-m", "32M")


def test_status_human_and_json(vm):
    r = migctl_here(vm.qmp_path, "status")
    assert r.returncode == 0, r.stderr
    assert "running" in r.stdout and "migration" in r.stdout
    r = migctl_here(vm.qmp_path, "status", "--json")
    assert r.returncode == 0
    (doc,) = json_lines(r.stdout)
    assert doc == {"status": vm.cmd("query-status"), "migration": {}}
    vm.cmd("stop")
    (doc,) = json_lines(migctl_here(vm.qmp_path, "status", "--json").stdout)
    assert doc["status"]["status"] == "paused" and doc["status"]["running"] is False


def test_tcp_address_form_is_accepted_but_unreachable_is_a_clear_error(vm, tmp_path):
    r = migctl_here(f"unix:{vm.qmp_path}", "status", "--json")
    assert r.returncode == 0
    r = migctl_here("tcp:127.0.0.1:1", "status")
    assert r.returncode == 1 and r.stderr.startswith("migctl: cannot connect to QMP socket tcp:127.0.0.1:1")


def test_tcp_qmp_socket(migd_factory):
    with socket.socket() as probe:  # a free port for the daemon's second QMP listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vm = migd_factory("tcpvm", "-m", "32M", "--qmp", f"tcp:127.0.0.1:{port}")
    for address in (f"tcp:127.0.0.1:{port}", f"127.0.0.1:{port}"):
        r = migctl_here(address, "status", "--json")
        assert r.returncode == 0, r.stderr
        assert json_lines(r.stdout)[0]["status"]["status"] == "running"
    assert vm.cmd("query-status")["status"] == "running"


def test_set_parameters(vm):
    r = migctl_here(vm.qmp_path, "set", "max-bandwidth=64M", "downtime-limit=50", "--json")
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stdout) == [{"max-bandwidth": 64 << 20, "downtime-limit": 50}]
    params = vm.cmd("query-migrate-parameters")
    assert params["max-bandwidth"] == 64 << 20 and params["downtime-limit"] == 50
    r = migctl_here(vm.qmp_path, "set", "downtime-limit=2000001")
    assert r.returncode == 1
    assert "Parameter 'downtime_limit' expects" in r.stderr  # QEMU's text, passed through
    assert vm.cmd("query-migrate-parameters")["downtime-limit"] == 50  # refused: nothing changed
    r = migctl_here(vm.qmp_path, "set", "downtime-limit")
    assert r.returncode == 1 and "expected NAME=VALUE" in r.stderr


def test_caps_show_and_set(vm):
    r = migctl_here(vm.qmp_path, "caps", "--json")
    (caps,) = json_lines(r.stdout)
    assert {"capability": "events", "state": False} in caps
    r = migctl_here(vm.qmp_path, "caps", "events=on", "auto-converge=on")
    assert r.returncode == 0, r.stderr
    lines = dict(line.split() for line in r.stdout.splitlines())
    assert lines["events"] == "on" and lines["auto-converge"] == "on" and lines["xbzrle"] == "off"
    state = {c["capability"]: c["state"] for c in vm.cmd("query-migrate-capabilities")}
    assert state["events"] and state["auto-converge"]
    r = migctl_here(vm.qmp_path, "caps", "no-such-cap=on", "--json")
    assert r.returncode == 1
    assert json_lines(r.stdout)[0]["error"]["class"] == "GenericError"


def test_cancel_without_migration_succeeds_like_qemu(vm):
    r = migctl_here(vm.qmp_path, "cancel", "--json")
    assert r.returncode == 0 and json_lines(r.stdout) == [{}]


def test_migrate_bad_uri_reports_qemu_error(vm):
    r = migctl_here(vm.qmp_path, "migrate", "bogus:thing", "--json")
    assert r.returncode == 1
    assert json_lines(r.stdout) == [{"error": {"class": "GenericError",
                                               "desc": "unknown migration protocol: bogus:thing"}}]


def test_events_follow_and_stop_after_count(vm):
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "-s", str(vm.qmp_path), "events", "--json",
                             "--count", "2", "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        # the follower is connected once the daemon lists two sessions; until then, keep toggling
        def toggled_and_seen() -> bool:
            vm.cmd("stop")
            vm.cmd("cont")
            return proc.poll() is not None

        vm.wait_for(toggled_and_seen, timeout=60, what="migctl events to see two events")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    events = json_lines(out)
    assert len(events) == 2
    assert all(e["event"] in ("STOP", "RESUME") and "timestamp" in e for e in events)


def test_events_timeout_without_events(vm):
    r = migctl(vm.qmp_path, "events", "--timeout", "0.5")
    assert r.returncode == 0 and "following events" in r.stdout


def test_raw(vm):
    r = migctl_here(vm.qmp_path, "raw", '{"execute": "query-status"}')
    assert r.returncode == 0
    assert json.loads(r.stdout)["return"]["status"] == "running"
    r = migctl_here(vm.qmp_path, "raw", '{"execute": "no-such-command"}', "--json")
    assert r.returncode == 1
    assert json_lines(r.stdout) == [{"error": {"class": "CommandNotFound",
                                               "desc": "The command no-such-command has not been found"}}]
    r = migctl_here(vm.qmp_path, "raw", "{not json")
    assert r.returncode == 1 and "invalid JSON" in r.stderr


def test_shell_lines_events_and_errors(vm, tmp_path):
    script = "\n".join([
        "# comments and blank lines are skipped",
        "",
        "query-status",
        "stop",
        'migrate-set-parameters {"downtime-limit": 77}',
        "migrate-set-parameters max-bandwidth=1M",
        '{"execute": "query-migrate-parameters"}',
        "no-such-command",
        "migrate {broken",
        "exit",
        "query-status",  # never sent: the shell left at 'exit'
    ]) + "\n"
    r = migctl(vm.qmp_path, "shell", "--json", input=script, env={"MIGCTL_HISTORY": str(tmp_path / "h")})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    docs = [json.loads(line) for line in lines if line.startswith("{")]
    replies = [d for d in docs if "event" not in d]
    assert replies[0]["return"]["status"] == "running"
    assert replies[1] == {"return": {}}
    assert any(d.get("event") == "STOP" for d in docs)
    params = replies[4]["return"]
    assert params["downtime-limit"] == 77 and params["max-bandwidth"] == 1 << 20
    assert replies[5]["error"]["class"] == "CommandNotFound"
    assert len(replies) == 6
    assert any(line.startswith("error: invalid JSON arguments") for line in lines)
    assert vm.cmd("query-status")["status"] == "paused"


def test_shell_on_a_terminal_completes_and_keeps_history(vm, tmp_path):
    """Through a real pseudo-terminal: Tab completes a command name from query-commands, the reply
    comes back, and the line lands in the history file."""
    history = tmp_path / "history"
    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO), MIGCTL_HISTORY=str(history), TERM="dumb")
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "-s", str(vm.qmp_path), "shell"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(token: bytes, timeout: float = 30) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while token not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {token!r} in {seen[-500:]!r}"
            ready, _, _ = select.select([master], [], [], left)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        read_until(b"(migd) ")
        os.write(master, b"query-sta\t")  # unique prefix: readline completes it to query-status
        read_until(b"query-status")
        os.write(master, b"\n")
        read_until(b'"singlestep"')
        read_until(b"(migd) ")
        os.write(master, b"exit\n")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert '"status": "running"' in seen.decode(errors="replace")
    assert "query-status" in history.read_text().splitlines()
