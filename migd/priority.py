"""Data-plane threads run at a lower CPU priority than the control plane.

Why: on a small host the migration's sender and receiver threads keep every core busy, and a QMP
request then waits for a CPU before the event loop can even read it (``migd/gilprobe.py`` put
80-90 % of the slow answers down to run-queue wait, not to the GIL). A data-plane thread that
calls :func:`lower_this_thread` at its start gets a higher nice value (``MIGD_DATA_PLANE_NICE``,
default :data:`DEFAULT_NICE` above the process's own); the event loop, the return-path reader and
anything else that answers someone keeps the process's nice, so the kernel hands it the CPU when
it wakes. Alone on the host the data plane loses nothing: nice only weighs threads that compete.

Linux applies nice per thread (``setpriority(PRIO_PROCESS, tid)``), and a thread started by a
lowered thread inherits the lowered value, so the data plane lowers itself where it starts; a
thread that must answer quickly is started before that point (the migration thread lowers itself
once its return-path reader and watchdog run; the incoming thread's watchdog, started mid-load,
runs lowered: it acts on silences of seconds). Raising a nice value back needs privilege
(CAP_SYS_NICE or RLIMIT_NICE), so a thread is lowered for good: the migration, incoming and
multifd threads end with their migration, and the vCPU threads are lowered as much, for life, so
that a busy guest and the migration thread still share a core as they did (QEMU runs both at one
priority; a guest at nice 0 would take 10 of 11 parts of it). ``MIGD_DATA_PLANE_NICE=0`` turns it
off. A failure to change it (a
seccomp profile, another OS) is logged once at debug level and ignored: priority is an
optimisation, never a reason to fail a migration.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger("migd.priority")

ENV = "MIGD_DATA_PLANE_NICE"
DEFAULT_NICE = 10  # added to the process's nice; capped at 19 (the lowest priority)
MAX_NICE = 19

_lock = threading.Lock()
_warned = False


def configured_increment() -> int:
    """The nice increment for data-plane threads: ``MIGD_DATA_PLANE_NICE`` (0..19), else the default;
    a value that is not such a number counts as the default (any thread)."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_NICE
    try:
        value = int(text)
    except ValueError:
        return DEFAULT_NICE
    return value if 0 <= value <= MAX_NICE else DEFAULT_NICE


def data_plane_nice(base: int, increment: int) -> int:
    """The nice a data-plane thread runs at, given the process's own (``base``) (any thread)."""
    return min(MAX_NICE, base + increment)


def _note_failure(exc: OSError) -> None:
    global _warned
    with _lock:
        if _warned:
            return
        _warned = True
    log.debug("data-plane threads keep their CPU priority: %s", exc.strerror or exc)


def lower_this_thread() -> int | None:
    """Lower the calling thread's CPU priority to the data plane's; idempotent: a thread already at
    or below it (started by a lowered thread) is left alone. Returns the thread's nice afterwards,
    None when it could not be read or changed (the calling data-plane thread)."""
    increment = configured_increment()
    if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS of a thread id may mean the process
        return None
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if increment == 0:
            return current
        # the process's own nice is the main thread's (its tid is the pid): the reference, so that
        # a thread started by a lowered one is not lowered twice
        target = data_plane_nice(os.getpriority(os.PRIO_PROCESS, os.getpid()), increment)
        if current < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
            return target
        return current
    except OSError as exc:  # not permitted here, or no per-thread priority on this OS
        _note_failure(exc)
        return None
