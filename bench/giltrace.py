"""Who holds the GIL while the event loop waits for it: exact hand-overs, not samples (perf uprobes).

A sampling probe (``migd/gilprobe.py``, py-spy) sees that the event loop woke late; it cannot tell a
thread that *holds* the GIL from one the host did not run. This traces every hand-over instead:
uprobes on CPython's ``take_gil`` (entry and return) and ``drop_gil``, plus ``sched:sched_switch``,
recorded with ``perf record -p PID`` for the daemon's whole migration. From them:

- every wait of the main thread (the event loop) for the GIL, and how much of it another thread
  held the GIL — the rest of a long wait the GIL was free and the loop had no CPU;
- per thread, how often it took the GIL and for how long in all (the data plane's hand-overs per
  GiB are what a change to its page path moves).

Needs root, ``perf``, and a CPython whose ``take_gil``/``drop_gil`` perf can find (symbols or debug
info). The probes exist kernel-wide while defined; :meth:`GilTrace.close` deletes them. Each hand-over
costs a few microseconds under a uprobe, so the latencies of a traced run are worse than a plain one's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

GROUP = "migdgil"
EVENTS = (f"{GROUP}:take", f"{GROUP}:taken__return", f"{GROUP}:drop")  # perf names a return probe so
LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)")
SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*==> next_comm=(.*?) next_pid=(\d+)")


def python_binary(pid: int) -> str:
    """The file holding CPython's GIL functions in process ``pid``: its libpython, else the executable."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1]
        if "libpython" in path and path.startswith("/"):
            return path
    return os.path.realpath(f"/proc/{pid}/exe")


class GilTrace:
    """Probes defined once for a CPython binary, one ``perf record`` per traced process."""

    def __init__(self, binary: str) -> None:
        if shutil.which("perf") is None:
            raise RuntimeError("--gil-trace needs perf")
        subprocess.run(["perf", "probe", "-q", "-d", f"{GROUP}:*"], capture_output=True)  # stale ones
        done = subprocess.run(["perf", "probe", "-q", "-x", binary, "-a", f"{GROUP}:take=take_gil",
                               "-a", f"{GROUP}:taken=take_gil%return", "-a", f"{GROUP}:drop=drop_gil"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"perf probe on {binary}: {done.stderr.strip() or 'failed'}")
        self.records: list[tuple[subprocess.Popen[bytes], Path, int]] = []

    def record(self, pid: int, out: Path, timeout: float = 10.0) -> None:
        """Start recording ``pid``; returns once perf has attached (its output file has a header)."""
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["perf", "record", "-q", "-m", "4096", "-o", str(out), "-p", str(pid)]
        for event in (*EVENTS, "sched:sched_switch"):
            cmd += ["-e", event]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.records.append((proc, out, pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.stat().st_size > 0:
                time.sleep(0.2)  # the header is written as the events are enabled
                return
            time.sleep(0.02)
        raise RuntimeError(f"perf record did not attach to {pid}")

    def stop(self) -> list[tuple[Path, int]]:
        """End every recording; (output file, traced pid) of each."""
        out = []
        for proc, path, pid in self.records:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            proc.wait(60)
            out.append((path, pid))
        self.records.clear()
        return out

    def close(self) -> None:
        """Stop what still records and delete the probes."""
        self.stop()
        subprocess.run(["perf", "probe", "-q", "-d", f"{GROUP}:*"], capture_output=True)


def summarize(path: Path, main: int, name: str, top: int = 6) -> list[str]:
    """Lines for one trace: the main thread's GIL waits (how many over 0.5 / 1 ms, and in how many of
    those another thread held the GIL for 0.5 ms or more) and the busiest GIL users."""
    text = subprocess.run(["perf", "script", "-i", str(path), "-F", "tid,time,event,trace"],
                          capture_output=True, text=True).stdout
    names: dict[int, str] = {}
    events: list[tuple[float, int, str]] = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        event = m[3].split(":")[-1]
        if event == "sched_switch":
            s = SWITCH.search(m[4])
            if s is not None:
                names[int(s[2])], names[int(s[4])] = s[1], s[3]
        else:
            events.append((float(m[2]), int(m[1]), event))
    events.sort()
    takes: Counter[int] = Counter()
    held: Counter[int] = Counter()
    holder: int | None = None
    since = 0.0
    wait_from: float | None = None
    other = 0.0  # GIL held by another thread during the current main wait
    waits: list[tuple[float, float]] = []
    for t, tid, event in events:
        if event == "take":
            if tid == main:
                wait_from, other = t, 0.0
        elif event == "taken__return":
            if tid == main and wait_from is not None:
                waits.append((t - wait_from, other))
                wait_from = None
            holder, since = tid, t
            takes[tid] += 1
        elif event == "drop" and holder == tid:
            held[tid] += t - since
            if wait_from is not None and tid != main:
                other += t - max(since, wait_from)
            holder = None
    if not waits:
        return [f"  {name}: no GIL wait of the main thread traced"]
    slow = [w for w in waits if w[0] >= 0.0005]
    lines = [f"  {name}: main thread waited for the GIL {len(waits)} times, {len(slow)} >= 0.5 ms "
             f"({sum(1 for w in waits if w[0] >= 0.001)} >= 1 ms); another thread held it >= 0.5 ms in "
             f"{sum(1 for w in slow if w[1] >= 0.0005)} of them (the rest of a slow wait the GIL was free "
             f"and the loop had no CPU)"]
    for tid, _ in held.most_common(top):
        label = "main" if tid == main else names.get(tid, str(tid))
        lines.append(f"    {label:<16} took the GIL {takes[tid]:7} times, held it {held[tid] * 1000:8.1f} ms in all")
    return lines
