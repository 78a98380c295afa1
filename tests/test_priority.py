"""Data-plane threads really run at the lowered priority (migd/priority.py), read from /proc as the
kernel sees them: the migration, multifd and vCPU threads at the data plane's nice, the event loop
and the return-path reader at the process's own; ``MIGD_DATA_PLANE_NICE=0`` changes nothing; an
unprivileged process can lower a thread and cannot raise it back (why only threads that never need
it back are lowered). No timing is asserted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import HELD, REPO, hold_active, release_hold, thread_names, wait_for

from migd.priority import DEFAULT_NICE, ENV, configured_increment, data_plane_nice, lower_this_thread


def _nice(pid: int, tid: int) -> int:
    """Field 19 of /proc/PID/task/TID/stat (after the parenthesised name: the 17th)."""
    return int(Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def threads(pid: int) -> dict[int, tuple[str, int]]:
    """tid -> (OS thread name, nice) of every thread of ``pid`` still alive."""
    out = {}
    for entry in os.listdir(f"/proc/{pid}/task"):
        tid = int(entry)
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            out[tid] = (comm, _nice(pid, tid))
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return out


def lowered(pid: int) -> dict[int, str]:
    """The threads of ``pid`` at the data plane's nice (relative to its main thread's)."""
    base = _nice(pid, pid)
    want = data_plane_nice(base, DEFAULT_NICE)
    return {tid: comm for tid, (comm, nice) in threads(pid).items() if nice == want and want != base}


def _multifd(vm: Any, channels: int) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})


BASE = os.getpriority(os.PRIO_PROCESS, 0)  # the daemons' own nice: they inherit this process's
NOTHING_BELOW = data_plane_nice(BASE, DEFAULT_NICE) == BASE


@pytest.mark.skipif(NOTHING_BELOW, reason="the tests already run at the lowest priority")
def test_migration_multifd_and_vcpu_threads_run_below_the_event_loop(migd_factory: Any) -> None:
    dst = migd_factory("dst", "-m", "32M", "--smp", "2", "-S", "--incoming", "defer")
    _multifd(dst, 2)
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = migd_factory("src", "-m", "32M", "--smp", "2", "--workload", "random,rate=64M,wss=4M")
    pid = src.proc.pid
    # before any migration: the two vCPUs only (they are lowered for life)
    wait_for(lambda: len(lowered(pid)) == 2, timeout=10, what="two lowered vCPU threads")
    _multifd(src, 2)
    hold_active(src)  # the threads are read while it waits at pause-before-switchover at the latest
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"unix:{sock}")
    wait_for(lambda: len(thread_names(src, "mig/src/mfd")) == 2, timeout=30, what="two sender threads")
    # vCPUs + the migration thread + both senders; the return-path reader, the heartbeat watchdog and
    # the event loop (the main thread) keep the process's priority
    wait_for(lambda: len(lowered(pid)) == 5, timeout=30, what="five lowered source threads")
    src_lowered = lowered(pid)
    assert sorted(n for n in src_lowered.values() if n.startswith("mig/src/mfd")) == ["mig/src/mfd0", "mig/src/mfd1"]
    assert pid not in src_lowered
    assert src.cmd("query-migrate")["status"] in HELD
    # the destination: its receivers (and incoming thread) lowered, its event loop not
    dpid = dst.proc.pid
    wait_for(lambda: len([n for n in lowered(dpid).values() if n.startswith("mig/dst/mfd")]) >= 2, timeout=30,
             what="lowered receiver threads")
    assert dpid not in lowered(dpid)
    release_hold(src)
    info = src.wait_for(lambda: (lambda i: i if i["status"] in ("completed", "failed") else None)(
        src.cmd("query-migrate")), timeout=60, what="migration end")
    assert info["status"] == "completed", info
    # the threads that ended took their priority with them: the vCPUs are left
    wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="sender threads gone")
    wait_for(lambda: len(lowered(pid)) == 2, timeout=10, what="only the vCPUs lowered")


def test_zero_turns_it_off(migd_factory: Any) -> None:
    vm = migd_factory("vm", "-m", "16M", "--smp", "2", "--workload", "random,rate=8M",
                      env={ENV: "0"})
    wait_for(lambda: vm.cmd("x-migd-query-workload")["vcpus"][1]["bytes-written"] > 0, timeout=30,
             what="both vCPUs running")
    assert {nice for _, nice in threads(vm.proc.pid).values()} == {_nice(vm.proc.pid, vm.proc.pid)}


def _in_thread(fn: Any) -> Any:
    """Run ``fn`` on a fresh thread of this process (its priority dies with it); its result."""
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(fn()))
    t.start()
    t.join(10)
    assert not t.is_alive() and result
    return result[0]


@pytest.mark.skipif(NOTHING_BELOW, reason="the tests already run at the lowest priority")
def test_lowering_is_idempotent_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    base = os.getpriority(os.PRIO_PROCESS, os.getpid())
    expect = min(19, base + DEFAULT_NICE)

    def lowered_then_child() -> tuple[int | None, int, int | None, int]:
        first = lower_this_thread()
        own = _nice(os.getpid(), threading.get_native_id())
        child = _in_thread(lambda: (lower_this_thread(), _nice(os.getpid(), threading.get_native_id())))
        return first, own, *child

    # a thread started by a lowered thread inherits its nice and is not lowered a second time
    assert _in_thread(lowered_then_child) == (expect, expect, expect, expect)
    monkeypatch.setenv(ENV, "19")
    assert _in_thread(lower_this_thread) == 19  # capped at the lowest priority
    for bad in ("x", "-3", "40"):  # not a nice increment: the default
        monkeypatch.setenv(ENV, bad)
        assert configured_increment() == DEFAULT_NICE
    monkeypatch.setenv(ENV, "0")
    assert _in_thread(lower_this_thread) == base
    assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == base  # the main thread never moves


UNPRIVILEGED = """
import os, threading
from migd.priority import lower_this_thread
out = []
def run():
    out.append(lower_this_thread())
    try:  # back to the process's own
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, os.getpid()))
        out.append("raised")
    except PermissionError:
        out.append("refused")
t = threading.Thread(target=run); t.start(); t.join()
print(out[0], out[1], os.getpriority(os.PRIO_PROCESS, os.getpid()))
"""


@pytest.mark.skipif(NOTHING_BELOW, reason="the tests already run at the lowest priority")
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop to nobody")
def test_an_unprivileged_daemon_lowers_and_cannot_raise_back(tmp_path: Path) -> None:
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", UNPRIVILEGED],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")})
    if done.returncode != 0 and "Permission denied" in done.stderr:
        pytest.skip(f"nobody cannot run {python} on the worktree: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(data_plane_nice(BASE, DEFAULT_NICE)), "refused", str(BASE)]
