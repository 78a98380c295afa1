"""A short GIL switch interval while any migration thread runs (``sys.setswitchinterval``).

What it does: a thread waiting for the GIL asks the holder to drop it after the switch interval
(CPython's default 5 ms); the holder drops it at its next bytecode boundary. So the interval bounds
how long a thread running *Python code* keeps others waiting, the event loop included, which needs
the GIL a few times per QMP answer. What it does not do: a single C call that keeps the GIL (a big
``bytes`` copy, ``json.dumps``, a full garbage collection) cannot be interrupted at any interval;
those are removed at their source (see bench/bench_gil_holds.py).

The interval is one per process and a relay runs an outgoing and an incoming migration at once, so
the first user sets it and the last one restores it. ``MIGD_SWITCH_INTERVAL_US`` sets another
interval (for measurements: 200 us measured no better than 1 ms on the loaded 2-core host, see
bench/README.md).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

INTERVAL = 0.001  # seconds while a migration runs: 1 ms instead of 5
ENV = "MIGD_SWITCH_INTERVAL_US"


def configured_interval() -> float:
    """The interval in seconds: ``MIGD_SWITCH_INTERVAL_US`` (microseconds, > 0), else INTERVAL."""
    try:
        us = float(os.environ.get(ENV, ""))
    except ValueError:
        return INTERVAL
    return us / 1e6 if us > 0 else INTERVAL

_lock = threading.Lock()
_users = 0
_saved = 0.0


@contextmanager
def fast_switching(interval: float | None = None) -> Iterator[None]:
    """The switch interval at most ``interval`` inside, the previous one restored by the last user
    (any thread)."""
    global _users, _saved
    if interval is None:
        interval = configured_interval()
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, interval))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved)
