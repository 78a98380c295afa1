"""What an operator meets with migctl: progress without a terminal, ETA and the not-converging warning,
SIGTERM handled like Ctrl-C, a demo that cannot hang or be shadowed by the working directory, the real
listening address of ``incoming``, global options on either side of the subcommand."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_for
from test_migctl_e2e import REPO, json_lines, migctl

from migd.migctl import build_parser, main
from migd.migctl.convergence import Convergence, forecast_eta, format_duration
from migd.migctl.demo import demo_time_limit, demo_workload
from migd.migctl.watch import plain_line

MiB = 1 << 20


def _info(remaining: int, sync: int, status: str = "active", mbps: float = 80.0, dirty_pages: int = 0,
          **extra: object) -> dict:
    ram = {"remaining": remaining, "total": 64 * MiB, "dirty-sync-count": sync, "mbps": mbps,
           "dirty-pages-rate": dirty_pages, "page-size": 4096, "transferred": 0}
    return {"status": status, "ram": ram, **extra}


# -- pure parts --------------------------------------------------------------------------------------

def test_first_pass_falling_is_progress_later_passes_must_start_lower() -> None:
    conv = Convergence(stall_after=5)
    for i in range(20):  # first pass: remaining falls steadily for 20 s
        conv.update(_info(64 * MiB - i * MiB, 1), float(i))
    assert not conv.stalled(20.0)
    t = 20.0
    for _ in range(10):  # every later pass starts with about the whole RAM dirty again
        conv.update(_info(60 * MiB, conv._pass + 1 if conv._pass else 2), t)
        conv.update(_info(1 * MiB, conv._pass), t + 0.5)  # drains to near zero within the pass
        t += 1.0
    assert conv.stalled(t)
    text = conv.warning(_info(1 * MiB, 9, dirty_pages=5000), t)
    assert text is not None and text.startswith("not converging: remaining has made no new low")
    assert "guest dirties 19.5 MiB/s, link sends 9.5 MiB/s" in text
    conv.update(_info(20 * MiB, 99), t)  # a pass that starts much lower: progress again
    assert not conv.stalled(t + 1) and conv.warning(_info(0, 99), t + 1) is None


def test_the_daemons_forecast_overrides_the_heuristic() -> None:
    conv = Convergence(stall_after=2)
    conv.update(_info(10 * MiB, 1, **{"x-migd-convergence": {"state": "stalled"}}), 0.0)
    conv.update(_info(5 * MiB, 1, **{"x-migd-convergence": {"state": "stalled"}}), 3.0)
    assert conv.stalled(3.0)
    conv.update(_info(50 * MiB, 5, **{"x-migd-convergence": {"state": "converging"}}), 4.0)
    assert not conv.stalled(4.0)
    # a pause before switch-over is not a stall
    paused = Convergence(stall_after=2)
    paused.update(_info(1 * MiB, 1), 0.0)
    paused.update(_info(1 * MiB, 1, status="pre-switchover"), 10.0)
    assert not paused.stalled(10.0)


def test_eta() -> None:
    assert forecast_eta(_info(0, 1, **{"x-migd-convergence": {"state": "converging", "eta-ms": 2500}})) == 2.5
    assert forecast_eta(_info(10 * MiB, 3, **{"x-migd-convergence": {"state": "diverging"}})) is None
    # 80 Mbit/s = 10 MB/s, nothing dirtied: 10 MB in 1 s
    assert forecast_eta(_info(10_000_000, 1)) == pytest.approx(1.0)
    # dirtied as fast as sent: never
    assert forecast_eta(_info(10_000_000, 1, dirty_pages=10_000_000 // 4096 + 1)) is None
    assert format_duration(None) == "?" and format_duration(3.21) == "3.2 s" and format_duration(125) == "2 min 05 s"
    line = plain_line(_info(16 * MiB, 2), 75.0, 3.0, 1.6)
    assert line.startswith("[    3.0 s]  active") and "75.0%" in line and line.endswith("ETA 1.6 s")
    assert "remaining 16.0 MiB of 64.0 MiB" in line


def test_demo_sizes_its_workload_to_the_link() -> None:
    assert demo_workload(0) == f"random,rate={64 * MiB}"
    assert demo_workload(50_000_000) == "random,rate=12500000"
    assert demo_workload(1 * MiB) == f"random,rate={256 * 1024}"
    assert demo_time_limit(1 << 30, 0) == 60.0
    assert demo_time_limit(1 << 30, 50_000_000) == pytest.approx(30 + 3 * (1 << 30) / 50_000_000)


@pytest.mark.parametrize("argv", [
    ["-s", "S", "--json", "status"], ["status", "-s", "S", "--json"], ["--json", "status", "-s", "S"],
    ["-s", "X", "status", "--socket", "S", "--json"],
])
def test_global_options_on_either_side(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.socket == "S" and args.json is True and args.command == "status"


def test_no_option_given_keeps_the_defaults() -> None:
    args = build_parser().parse_args(["status"])
    assert args.json is False and args.connect_timeout == 10.0 and args.verbose is False


# -- against daemons ---------------------------------------------------------------------------------

@pytest.fixture
def vm(migd_factory):
    return migd_factory("ctl", "-m", "32M")


def test_global_options_after_the_subcommand_against_a_daemon(vm) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["status", "-s", str(vm.qmp_path), "--json"])
    assert code == 0
    (doc,) = json_lines(out.getvalue())
    assert doc["status"]["status"] == "running"


def test_incoming_prints_the_port_it_really_listens_on(migd_factory) -> None:
    dst = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    r = migctl(dst.qmp_path, "incoming", "tcp:127.0.0.1:0")
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"waiting for an incoming migration on tcp:127\.0\.0\.1:(\d+)\n", r.stdout)
    assert m is not None, r.stdout
    (addr,) = dst.cmd("query-migrate")["socket-address"]
    assert int(m.group(1)) == int(addr["port"]) != 0


def _pair(migd_factory, memory: str, workload: str):
    dst = migd_factory("dst", "-m", memory, "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = migd_factory("src", "-m", memory, "--workload", workload)
    return src, dst, f"unix:{sock}"


def test_wait_without_a_terminal_prints_a_line_per_second_and_warns(migd_factory) -> None:
    """8 MiB dirtied at 16 MiB/s over a 4 MiB/s link: every pass starts with all of RAM again, and a
    1 ms downtime limit keeps the switch-over out of reach (the final pass would run uncapped)."""
    src, _, uri = _pair(migd_factory, "8M", "random,rate=16M")
    started = time.monotonic()
    r = migctl(src.qmp_path, "migrate", uri, "--bandwidth", "4M", "--downtime", "1", "--wait",
               "--stall-warn", "2", "--time-limit", "8", timeout=120)
    wall = time.monotonic() - started
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("[")]
    assert len(lines) >= 5, r.stdout
    assert len(lines) <= wall + 4, r.stdout  # one a second (and one per status change), not one per poll
    assert all("ETA " in line and "remaining" in line for line in lines)
    elapsed = [float(line[1:8]) for line in lines]
    assert elapsed == sorted(elapsed) and elapsed[-1] >= 7
    assert "warning: not converging: remaining has made no new low" in r.stderr
    assert "did not complete within the time limit of 8 s" in r.stderr
    assert "migration cancelled: the migration did not complete within the time limit" in r.stderr
    assert "migration summary" in r.stdout
    assert src.cmd("query-migrate")["status"] == "cancelled"


def test_json_progress_carries_elapsed_eta_and_convergence(migd_factory) -> None:
    src, _, uri = _pair(migd_factory, "32M", "random,rate=64M")
    src.wait_for(lambda: src.cmd("x-migd-query-workload")["vcpus"][0]["bytes-written"] > 24 * MiB,
                 what="24 MiB of guest data to send")
    src.cmd("x-migd-workload-set", spec="random,rate=512K")
    # the switch-over is told it has only the 8 MiB/s too (QEMU's avail-switchover-bandwidth): without
    # it the uncapped final pass fits 32 MiB in the downtime at once; with it the 24 MiB take ~3 s,
    # converging with an ETA, however fast the host is
    src.cmd("migrate-set-parameters", **{"avail-switchover-bandwidth": 8 * MiB})
    r = migctl(src.qmp_path, "migrate", uri, "--bandwidth", "8M", "--wait", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    progress = [d for d in json_lines(r.stdout) if "progress" in d]
    assert len(progress) >= 2
    assert all(isinstance(p["elapsed"], float) and p["converging"] is True for p in progress)
    assert any(isinstance(p["eta"], float) for p in progress if p["status"] == "active")


def _read_pty(fd: int, until: bytes, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while until not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data


def test_sigterm_on_migrate_wait_cancels_and_restores_the_cursor(migd_factory) -> None:
    src, _, uri = _pair(migd_factory, "64M", "random,rate=4M")
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120", TERM="xterm")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "-s", str(src.qmp_path), "migrate", uri,
                             "--bandwidth", "1M", "--wait"], stdin=follower, stdout=follower, stderr=follower,
                            env=env, close_fds=True)
    os.close(follower)
    try:
        seen = _read_pty(leader, b"elapsed", 60)
        assert b"elapsed" in seen, seen
        assert b"\x1b[?25l" in seen  # the live panel hid the cursor
        proc.send_signal(signal.SIGTERM)
        rest = seen + _read_pty(leader, b"migration cancelled", 60)
        proc.wait(timeout=60)
        rest += _read_pty(leader, b"\x00never", 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    assert proc.returncode == 1, rest
    assert rest.rfind(b"\x1b[?25h") > rest.rfind(b"\x1b[?25l")  # and it is shown again
    assert b"migration cancelled: cancelled by the operator" in rest
    assert src.cmd("query-migrate")["status"] == "cancelled"


def _no_leftovers(text: str) -> None:
    workdir = re.search(r"destination in (\S+)", text).group(1)
    wait_for(lambda: not Path(workdir).exists(), timeout=10, what="the demo's folder removed")
    assert subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout == ""


def test_sigterm_on_demo_cleans_up_everything() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "demo", "--memory", "64M", "--bandwidth", "2M"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[demo] migrating to" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + out
    assert proc.returncode in (1, 130), text
    assert "demo failed: the migration ended 'cancelled'" in text or "demo interrupted; cleaned up" in text
    _no_leftovers(text)


def test_demo_on_a_slow_link_with_a_hungry_guest_gives_up_and_says_why() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    started = time.monotonic()
    # a 1 ms downtime limit: no switch-over fits (the policy would otherwise switch over at once,
    # its final pass running uncapped)
    r = subprocess.run([sys.executable, "-m", "migd.migctl", "demo", "--memory", "32M", "--bandwidth", "4M",
                        "--workload", "random,rate=32M", "--downtime", "1", "--time-limit", "6"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert time.monotonic() - started < 60
    assert r.returncode == 1, r.stdout + r.stderr
    assert "did not complete within the time limit of 6 s" in r.stderr
    assert "demo failed: the migration ended 'cancelled' (the migration did not complete" in r.stderr
    assert "[    " in r.stdout  # plain progress lines while stdout is a pipe
    _no_leftovers(r.stdout)


def test_demo_sized_to_a_slow_link_converges() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "migd.migctl", "demo", "--memory", "32M", "--bandwidth", "8M"],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"workload random,rate={2 * MiB}" in r.stdout
    assert "RAM digest equal on both sides" in r.stdout


def test_demo_from_a_directory_that_shadows_migd(tmp_path) -> None:
    """The working directory holds a ``migd`` that is not migd (as the folder above a clone does):
    migctl run from there, with no PYTHONPATH, still starts the migd it was itself imported from."""
    shadow = tmp_path / "migd"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('this is not migd')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from migd.migctl import main; "
            "sys.exit(main(['demo', '--memory', '32M']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RAM digest equal on both sides" in r.stdout
    assert json.dumps("this is not migd") not in r.stdout + r.stderr


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    """Up to a whole line of the process's stdout, waiting at most ``timeout`` seconds for it."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output in time"
    return proc.stdout.readline()


@pytest.mark.parametrize("command", [["shell", "--json"], ["events"]])
def test_sigterm_ends_long_running_commands(vm, command: list[str]) -> None:
    """The shell shrugs off Ctrl-C at its prompt (it clears the line) but ends on SIGTERM; so does events."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "-s", str(vm.qmp_path), *command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        if command[0] == "shell":
            proc.stdin.write("query-status\n")
            proc.stdin.flush()
            assert json.loads(_line(proc, 30))["return"]["running"] is True  # connected and answering
        else:
            assert _line(proc, 30).startswith("following events")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # stdin stays open: only the signal can end it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "migctl: interrupted" in err
