"""Auto-converge: slow the vCPUs down when the guest dirties RAM faster than the migration sends it.

QEMU's rule (ram.c ``migration_trigger_throttle``), evaluated at every bitmap sync that ends a period
of more than one second: if the bytes dirtied in the period exceed ``throttle-trigger-threshold`` % of
the bytes sent in it, for the second time (the counter is not reset by quiet periods), throttle down:
start at ``cpu-throttle-initial``, then add ``cpu-throttle-increment`` (or less, with
``cpu-throttle-tailslow``) up to ``max-cpu-throttle``. The vCPUs do the sleeping
(``VCPUSet.throttle``); the throttle is removed when the migration ends, however it ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

log = logging.getLogger("migd.migration")

PERIOD = 1.0  # seconds: QEMU's bitmap-sync period for rates and throttling
CPU_THROTTLE_PCT_MIN = 1
CPU_THROTTLE_PCT_MAX = 99


class Throttleable(Protocol):
    def throttle(self, pct: int) -> None: ...


class AutoConverge:
    """Per-migration throttle state. Called from the migration thread only."""

    def __init__(self, vcpus: Throttleable, params: Callable[[], Mapping[str, Any]]) -> None:
        self._vcpus = vcpus
        self._params = params
        self.percentage = 0  # 0 = not throttling
        self.dirty_rate_high_cnt = 0
        self._period_start: float | None = None
        self._period_bytes = 0
        self._period_dirty_pages = 0

    def note_sync(self, new_dirty_pages: int, transferred: int, page_size: int, now: float) -> None:
        """One bitmap sync found ``new_dirty_pages`` newly dirty; at a period end, maybe throttle."""
        if self._period_start is None:
            self._period_start, self._period_bytes = now, transferred
            return
        self._period_dirty_pages += new_dirty_pages
        if now - self._period_start <= PERIOD:
            return
        self.trigger(transferred - self._period_bytes, self._period_dirty_pages * page_size)
        self._period_start, self._period_bytes, self._period_dirty_pages = now, transferred, 0

    def trigger(self, bytes_xfer_period: int, bytes_dirty_period: int) -> None:
        """QEMU's migration_trigger_throttle for one finished period."""
        threshold = bytes_xfer_period * int(self._params()["throttle-trigger-threshold"]) / 100
        if bytes_dirty_period > threshold:
            self.dirty_rate_high_cnt += 1
            if self.dirty_rate_high_cnt >= 2:
                self.dirty_rate_high_cnt = 0
                self._throttle_down(threshold, bytes_dirty_period)

    def _throttle_down(self, bytes_dirty_threshold: float, bytes_dirty_period: int) -> None:
        p = self._params()
        initial, increment = int(p["cpu-throttle-initial"]), int(p["cpu-throttle-increment"])
        maximum = int(p["max-cpu-throttle"])
        if not self.percentage:
            new = initial
        else:
            step = increment
            if p["cpu-throttle-tailslow"] and bytes_dirty_period:
                cpu_now = 100 - self.percentage
                cpu_ideal = cpu_now * (bytes_dirty_threshold / bytes_dirty_period)
                step = min(int(cpu_now - cpu_ideal), increment)
            new = min(self.percentage + step, maximum)
        self._set(max(CPU_THROTTLE_PCT_MIN, min(new, CPU_THROTTLE_PCT_MAX)))

    def _set(self, pct: int) -> None:
        if pct != self.percentage:
            log.info("auto-converge: cpu throttle %d%% -> %d%%", self.percentage, pct)
        self.percentage = pct
        self._vcpus.throttle(pct)

    def stop(self) -> None:
        """Remove the throttle (end of the migration, whatever the outcome)."""
        if self.percentage:
            log.info("auto-converge: cpu throttle %d%% -> off", self.percentage)
            self.percentage = 0
            self._vcpus.throttle(0)
