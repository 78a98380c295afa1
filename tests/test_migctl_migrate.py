"""migctl driving real migrations between two migd processes: --wait (human and --json), the percent
never running backwards, failure exit codes, Ctrl-C cancelling, and the demo end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_migctl_e2e import REPO, json_lines, migctl

pytestmark = pytest.mark.e2e


def pair(migd_factory, *src_args: str):
    dst = migd_factory("dst", "-m", "64M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = migd_factory("src", "-m", "64M", *src_args)
    return src, dst, f"unix:{sock}"


def test_migrate_wait_json_progress_is_monotonic(migd_factory):
    src, dst, uri = pair(migd_factory, "--workload", "random,rate=8M")
    # 64 MiB at 32 MiB/s: a couple of seconds, so several progress lines
    r = migctl(src.qmp_path, "migrate", uri, "--bandwidth", "32M", "--downtime", "100", "--wait", "--json",
               timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    docs = json_lines(r.stdout)
    progress = [d for d in docs if "progress" in d]
    final = docs[-1]
    assert final["status"] == "completed" and "downtime" in final and final["ram"]["remaining"] == 0
    assert "x-migd-downtime-phases" in final
    percents = [p["progress"] for p in progress]
    assert len(percents) >= 2
    assert percents == sorted(percents), percents
    assert all(p < 100 for p, d in zip(percents, progress, strict=True) if d["status"] != "completed")
    assert progress[-1]["status"] == "completed" and percents[-1] == 100
    params = src.cmd("query-migrate-parameters")
    assert params["max-bandwidth"] == 32 << 20 and params["downtime-limit"] == 100
    assert dst.cmd("query-migrate")["status"] == "completed"


def test_migrate_wait_human_summary(migd_factory):
    src, dst, uri = pair(migd_factory)
    r = migctl(src.qmp_path, "migrate", uri, "--bandwidth", "0", "--auto-converge", "--wait", timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "migration summary" in r.stdout and "completed" in r.stdout
    assert re.search(r"downtime\s+│?\s*\d+ ms \(limit 300 ms\)", r.stdout), r.stdout
    assert "phase " in r.stdout
    caps = {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}
    assert caps["auto-converge"]


def test_migrate_not_waiting_and_failure_exit_code(migd_factory, tmp_path):
    src = migd_factory("src", "-m", "32M")
    r = migctl(src.qmp_path, "migrate", f"unix:{tmp_path}/nobody-listens.sock", "--wait", "--json", timeout=60)
    assert r.returncode == 1
    final = json_lines(r.stdout)[-1]
    assert final["status"] == "failed" and final["error-desc"]
    assert "migration failed:" in r.stderr
    assert src.cmd("query-status")["running"] is True


def test_ctrl_c_cancels_the_migration(migd_factory):
    src, dst, uri = pair(migd_factory, "--workload", "random,rate=4M")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # held until interrupted: pause-before-switchover is the barrier (a 1 ms limit alone is no hold,
    # see helpers.hold_active), and the 1 ms downtime keeps it active before that
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "-s", str(src.qmp_path), "migrate", uri,
                             "--downtime", "1", "--wait", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()  # the first progress line: migctl is waiting now
        assert json.loads(first)["status"] in ("setup", "active", "pre-switchover"), first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    final = json_lines(out)[-1]
    assert final["status"] == "cancelled"
    assert "migration cancelled: cancelled by the operator" in err
    assert src.cmd("query-migrate")["status"] == "cancelled"
    src.wait_for(lambda: src.cmd("query-status")["status"] == "running", what="the source guest running")


def test_incoming_on_a_deferred_destination(migd_factory, tmp_path):
    dst = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    r = migctl(dst.qmp_path, "incoming", f"unix:{sock}", "--json")
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stdout) == [{"socket-address": [{"type": "unix", "path": str(sock)}]}]
    dst.wait_for(lambda: sock.exists(), what="the incoming socket")
    r = migctl(dst.qmp_path, "incoming", f"unix:{sock}")
    assert r.returncode == 1 and "The incoming migration has already been started" in r.stderr


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_demo(transport):
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="120")
    r = subprocess.run([sys.executable, "-m", "migd.migctl", "demo", "--memory", "64M", "--workload",
                        "random,rate=16M", "--transport", transport], capture_output=True, text=True,
                       timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RAM digest equal on both sides" in r.stdout
    assert "guest workload progressing on the destination" in r.stdout
    assert "demo result" in r.stdout and "downtime" in r.stdout
    workdir = re.search(r"destination in (\S+)", r.stdout).group(1)
    assert not Path(workdir).exists()  # every file removed
    leftover = subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True)
    assert leftover.stdout == ""  # and every process gone


def test_demo_bad_option_is_a_clear_error():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "migd.migctl", "demo", "--memory", "lots"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 2 and "invalid size 'lots'" in r.stderr


def test_demo_interrupted_cleans_up_everything():
    """Ctrl-C in the middle of the demo's migration: it is cancelled, the demo fails clearly, and no
    process or file of it remains."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "migd.migctl", "demo", "--memory", "64M", "--bandwidth", "2M"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "[demo] migrating to" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + out
    # the signal lands either while the migration is followed (cancelled: exit 1) or just before
    # (the demo stops: exit 130); both must end cleanly
    if proc.returncode == 1:
        assert "demo failed: the migration ended 'cancelled'" in text
    else:
        assert proc.returncode == 130 and "demo interrupted; cleaned up" in text, text
    workdir = re.search(r"destination in (\S+)", text).group(1)
    assert not Path(workdir).exists()
    assert subprocess.run(["pgrep", "-f", workdir], capture_output=True, text=True).stdout == ""
