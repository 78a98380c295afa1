"""A debug-only probe for calls that hold the GIL too long (``MIGD_GIL_PROBE=1``).

The event loop answers QMP only when it gets the GIL; a C call of another thread that keeps the GIL
for milliseconds (a numpy reduction that does not release it, a big ``bytes`` copy) delays every
answer by as much. This probe is a thread that sleeps ``TICK`` in a loop and measures how late it
wakes: lateness beyond ``MIGD_GIL_PROBE_MS`` (default 0.5 ms) means someone held the GIL, or the
host gave us no CPU; the probe's own run-queue delay (``/proc/thread-self/schedstat``) tells the two
apart. Every thread's CPU clock is read at each wake-up, so a stall names the threads that ran
during it; the holder is the busiest one. Its stack is taken with ``sys._current_frames()`` right
away: the holder drops the GIL at its next eval-breaker check, so its innermost frame is at, or just
after, the line that made the long call.

Each stall is one JSON line in the file named by ``MIGD_GIL_PROBE_OUT`` (or a WARNING log line):
``{"t": monotonic s, "late_ms": ms, "runq_ms": ms, "threads": {name: {"cpu_ms": ms, "stack":
["file:line func", ...]}}}``, busiest first, stacks innermost first; and one line per garbage
collection longer than the threshold: ``{"t": s, "gc": generation, "ms": ms, "thread": name}``. ``bench/bench_query_latency.py --probe`` reads them.
Off (the default) it costs nothing: nothing is imported or started.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import threading
import time
from types import FrameType
from typing import IO, Any

log = logging.getLogger("migd.gilprobe")

ENV = "MIGD_GIL_PROBE"
ENV_MS = "MIGD_GIL_PROBE_MS"
ENV_OUT = "MIGD_GIL_PROBE_OUT"
TICK = 0.0001  # seconds asleep per probe step
DEPTH = 6  # frames kept per thread
# innermost functions of a thread that waits with the GIL released: never the holder
# (only pure waits: a thread blocked in a socket call shows the Python function that made it, which
# may as well be the culprit)
WAITING = frozenset({"wait", "_wait_for_tstate_lock", "select", "poll", "accept", "run_forever",
                     "run_until_complete"})


def _where(frame: FrameType | None) -> list[str]:
    """Up to DEPTH frames, innermost first, as ``path:line function`` with the path from migd/ on."""
    out: list[str] = []
    while frame is not None and len(out) < DEPTH:
        code = frame.f_code
        path = code.co_filename
        cut = path.rfind("/migd/")
        short = path[cut + 1:] if cut >= 0 else os.path.basename(path)
        out.append(f"{short}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return out


def stall_record(late: float, runq: float, now: float, cpu: dict[int, float], frames: dict[int, FrameType],
                 names: dict[int, str]) -> dict[str, Any]:
    """One stall: its lateness, how much of it the probe waited for a CPU (``runq_ms``, the host's
    share, not the GIL's), and the threads that ran meanwhile (CPU time over the stall, stack),
    busiest first; the busiest is the likely holder (any thread)."""
    threads: dict[str, dict[str, Any]] = {}
    for ident, used in sorted(cpu.items(), key=lambda kv: kv[1], reverse=True):
        frame = frames.get(ident)
        if frame is None or used < 0.1 * late:
            continue
        if frame.f_code.co_name in WAITING and used < 0.5 * late:
            continue
        threads[names.get(ident, str(ident))] = {"cpu_ms": round(used * 1000, 3), "stack": _where(frame)}
    return {"t": round(now, 6), "late_ms": round(late * 1000, 3), "runq_ms": round(runq * 1000, 3),
            "threads": threads}


def _run_delay(fd: int) -> float:
    """Seconds this thread has waited on a run queue so far (/proc/thread-self/schedstat)."""
    try:
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class GilProbe(threading.Thread):
    """The probe thread: wakes every TICK and reports wake-ups later than ``threshold`` seconds."""

    REFRESH = 0.1  # seconds between re-reads of the thread list

    def __init__(self, threshold: float, out: IO[str] | None) -> None:
        super().__init__(name="gilprobe", daemon=True)
        self.threshold = threshold
        self.out = out
        self.stalls = 0
        self._stop_event = threading.Event()
        self._gc_start = 0.0

    def _threads(self, me: int) -> tuple[dict[int, int], dict[int, str]]:
        clocks: dict[int, int] = {}
        names: dict[int, str] = {}
        for t in threading.enumerate():
            if t.ident is None or t.ident == me:
                continue
            try:
                clocks[t.ident] = time.pthread_getcpuclockid(t.ident)
            except (OSError, ProcessLookupError):
                continue
            names[t.ident] = t.name
        return clocks, names

    def _cpu(self, clocks: dict[int, int]) -> dict[int, float]:
        out: dict[int, float] = {}
        for ident, clk in clocks.items():
            try:
                out[ident] = time.clock_gettime(clk)
            except OSError:  # the thread ended
                continue
        return out

    def run(self) -> None:
        """Sleep, measure, record (probe thread)."""
        me = threading.get_ident()
        clock = time.perf_counter
        try:
            fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            fd = -1
        clocks, names = self._threads(me)
        refreshed = clock()
        rq0 = _run_delay(fd) if fd >= 0 else 0.0
        cpu0 = self._cpu(clocks)
        while not self._stop_event.is_set():
            t0 = clock()
            time.sleep(TICK)
            now = clock()
            late = now - t0 - TICK
            rq = _run_delay(fd) if fd >= 0 else 0.0
            cpu = self._cpu(clocks)
            if late > self.threshold:
                used = {i: c - cpu0[i] for i, c in cpu.items() if i in cpu0}
                rec = stall_record(late, rq - rq0, time.monotonic(), used, sys._current_frames(), names)
                self.stalls += 1
                self._emit(rec)
            rq0, cpu0 = rq, cpu
            if now - refreshed > self.REFRESH:
                clocks, names = self._threads(me)
                cpu0 = self._cpu(clocks)
                refreshed = clock()

    def _emit(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()
        else:
            log.warning("GIL stall %s", line)

    def stop(self) -> None:
        """Ask the probe to end (any thread)."""
        self._stop_event.set()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def watch_gc(self) -> None:
        """Also report every garbage collection longer than the threshold: the cyclic collector
        holds the GIL for its whole pass (a full one walks every tracked object)."""
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        """gc callback (whichever thread triggered the collection)."""
        now = time.perf_counter()
        if phase == "start":
            self._gc_start = now
            return
        took = now - self._gc_start
        if took > self.threshold:
            self._emit({"t": round(time.monotonic(), 6), "gc": info.get("generation"), "ms": round(took * 1000, 3),
                        "thread": threading.current_thread().name, "collected": info.get("collected")})


def start_from_env() -> GilProbe | None:
    """Start the probe when ``MIGD_GIL_PROBE=1`` (main thread, at start-up); otherwise nothing."""
    if os.environ.get(ENV) != "1":
        return None
    threshold = float(os.environ.get(ENV_MS, "0.5")) / 1000
    path = os.environ.get(ENV_OUT)
    out = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - lives as long as the process
    probe = GilProbe(threshold, out)
    probe.watch_gc()
    probe.start()
    log.info("GIL probe on: stalls over %.2f ms go to %s", threshold * 1000, path or "the log")
    return probe
