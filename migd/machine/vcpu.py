"""vCPU threads: run the workload in ~10 ms slices, stop with acknowledgement, throttle.

A vCPU never takes the big lock: like hardware, it writes guest RAM directly and only checks between
slices whether it was asked to pause or to sleep for the throttle. ``pause_all`` returns once every
vCPU has acknowledged (the "stop all cpus correctly" fix of the migration-thread work), so the caller
knows no vCPU writes RAM any more.

Largest stall (the guest-felt probe: "ask for a 10 ms sleep, see how long it takes") is the longest
gap between the starts of two consecutive slices. Throttle sleeps and pauses for migration count,
because the guest feels them (a switch-over shows up as its downtime); a pause the user asked for
(``stop`` -> paused) does not, its gap is forgotten on resume. Across a migration the gap runs from
the source's last slice (wall clock, carried in the vCPU's device state) to the destination's first
slice, or to the end of the load when the destination stays paused (-S).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from migd.priority import lower_this_thread

SLICE = 0.010  # seconds of guest run time per slice
RATE_WINDOW = 2.0  # seconds over which the achieved rate is measured


@dataclass
class VCPUStats:
    """What one vCPU did; guest-visible parts of it travel with the machine as device state."""

    slices: int = 0
    bytes_written: int = 0
    disk_bytes_written: int = 0
    run_time: float = 0.0  # seconds spent running slices (not paused, not throttled)
    largest_stall: float = 0.0  # seconds
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=512))

    def achieved(self) -> tuple[float, float]:
        """(RAM bytes/s, disk bytes/s) over the last RATE_WINDOW seconds of samples."""
        samples = list(self.samples)  # one C-level copy: the vCPU thread appends concurrently
        if len(samples) < 2:
            return 0.0, 0.0
        t1, b1, d1 = samples[-1]
        if time.monotonic() - t1 > RATE_WINDOW:  # not running lately: nothing is being written
            return 0.0, 0.0
        t0, b0, d0 = samples[0]
        for t, b, d in samples:
            if t1 - t <= RATE_WINDOW:
                t0, b0, d0 = t, b, d
                break
        dt = t1 - t0
        if dt <= 0:
            return 0.0, 0.0
        return (b1 - b0) / dt, (d1 - d0) / dt


SliceRunner = Callable[["VCPU"], None]


class VCPU:
    """One vCPU thread. Its workload state (``wstate``) belongs to the current workload."""

    def __init__(self, vset: VCPUSet, index: int) -> None:
        self.index = index
        self.vset = vset
        self.stats = VCPUStats()
        self.wstate: object | None = None  # owned by the workload (rng position, counter, ...)
        self.error: str | None = None
        self.paused = True  # acknowledged stopped (True until the thread first runs)
        self._last_start: float | None = None
        self._wall_ref: float | None = None  # wall clock of the last slice before a migration
        self.thread = threading.Thread(target=self._main, name=f"vcpu{index}", daemon=True)

    # -- stall bookkeeping ----------------------------------------------------------------------

    def last_slice_wall(self) -> float:
        """Wall-clock time of this vCPU's last slice start (0 when it never ran)."""
        if self._last_start is None:
            return self._wall_ref or 0.0
        return time.time() - (time.monotonic() - self._last_start)

    def set_wall_ref(self, wall: float) -> None:
        """After an incoming migration: the next slice measures its gap from this wall time."""
        self._wall_ref = wall if wall > 0 else None
        self._last_start = None

    def settle_wall_ref(self) -> None:
        """An incoming guest that stays paused (-S): its stall ends now, the user's wait is not one."""
        if self._wall_ref is not None:
            self.stats.largest_stall = max(self.stats.largest_stall, max(0.0, time.time() - self._wall_ref))
            self._wall_ref = None

    def forget_gap(self) -> None:
        self._last_start = None
        self._wall_ref = None

    def reset_stats(self) -> None:
        self.stats = VCPUStats()
        self.error = None

    # -- the thread -----------------------------------------------------------------------------

    def _main(self) -> None:
        lower_this_thread()  # the guest is data plane too: as the migration thread (migd/priority.py)
        vset = self.vset
        cond = vset.cond
        while True:
            with cond:
                if not vset.run_requested or vset.holds or vset.exiting:
                    self.paused = True
                    cond.notify_all()
                    while (not vset.run_requested or vset.holds) and not vset.exiting:
                        cond.wait()
                    if vset.exiting:
                        return
                    self.paused = False
                    if not vset.count_pause:
                        self.forget_gap()
            self._slice()
            pct = vset.throttle_percentage
            if pct:
                vset.sleep_unless_paused(pct / (100 - pct) * SLICE)

    def _slice(self) -> None:
        stats = self.stats
        start = time.monotonic()
        if self._last_start is not None:
            gap = start - self._last_start
        elif self._wall_ref is not None:
            gap = max(0.0, time.time() - self._wall_ref)
        else:
            gap = 0.0
        self._wall_ref = None
        stats.largest_stall = max(stats.largest_stall, gap)
        self._last_start = start
        if self.error is None:
            try:
                self.vset.runner(self)
            except Exception as exc:  # a workload bug must not kill the vCPU silently
                self.error = f"{type(exc).__name__}: {exc}"
        self.vset.sleep_unless_paused(SLICE - (time.monotonic() - start))
        now = time.monotonic()
        stats.run_time += now - start
        stats.slices += 1
        stats.samples.append((now, stats.bytes_written, stats.disk_bytes_written))


def _idle(vcpu: VCPU) -> None:
    return None


class VCPUSet:
    """The machine's vCPUs, started paused."""

    def __init__(self, n: int, runner: SliceRunner = _idle) -> None:
        if n < 1:
            raise ValueError("a machine needs at least one vCPU")
        self.cond = threading.Condition()
        self.run_requested = False
        self.exiting = False
        self.count_pause = True
        self.runner = runner
        self.holds = 0  # hold_paused() calls not yet released: paused vCPUs stay paused meanwhile
        self._throttle = 0
        self._vcpus = [VCPU(self, i) for i in range(n)]
        self._started = False

    def __len__(self) -> int:
        return len(self._vcpus)

    def __iter__(self) -> Iterator[VCPU]:
        return iter(self._vcpus)

    def __getitem__(self, i: int) -> VCPU:
        return self._vcpus[i]

    def start(self) -> None:
        """Spawn the threads (paused); ``resume_all`` lets them run."""
        if not self._started:
            self._started = True
            for v in self._vcpus:
                v.thread.start()

    @property
    def running(self) -> bool:
        return self.run_requested and not self.exiting

    def pause_all(self, *, count_stall: bool = True, timeout: float | None = None,
                  abort: Callable[[], bool] | None = None) -> bool:
        """Ask every vCPU to stop and wait until each acknowledged; False on timeout or abort.

        ``count_stall`` says whether the guest should feel this pause as a stall (migration: yes,
        a user's ``stop``: no). ``abort`` is re-checked whenever ``wake_pausers`` is called: a
        cancelled migration must not wait for a vCPU that never acknowledges.
        """
        if threading.current_thread() in {v.thread for v in self._vcpus}:
            raise RuntimeError("pause_all called from a vCPU thread")
        with self.cond:
            self.run_requested = False
            self.count_pause = count_stall
            self.cond.notify_all()
            if abort is None:
                return self.cond.wait_for(self._all_paused, timeout)
            self.cond.wait_for(lambda: self._all_paused() or abort(), timeout)
            return self._all_paused()

    def wake_pausers(self) -> None:
        """(any thread) Make every ``pause_all`` waiting now re-check its ``abort``."""
        with self.cond:
            self.cond.notify_all()

    def _all_paused(self) -> bool:
        return all(v.paused or not v.thread.is_alive() for v in self._vcpus)

    def all_paused(self) -> bool:
        with self.cond:
            return self._all_paused()

    def hold_paused(self) -> bool:
        """(any thread) If every vCPU is paused, keep them so, even across a ``resume_all``, until
        ``release_hold``: guest RAM cannot change meanwhile (a zero-copy send hashing what it sends
        straight from RAM relies on it). False, and nothing held, when some vCPU runs."""
        with self.cond:
            if self.run_requested or not self._all_paused():
                return False
            self.holds += 1
            return True

    def release_hold(self) -> None:
        """(any thread) End one ``hold_paused``; a resume asked for meanwhile takes effect now."""
        with self.cond:
            self.holds -= 1
            self.cond.notify_all()

    def resume_all(self) -> None:
        with self.cond:
            if not self.exiting:
                self.run_requested = True
                self.cond.notify_all()

    def sleep_unless_paused(self, seconds: float) -> None:
        """Sleep inside a slice; returns early when a pause or exit is requested."""
        if seconds <= 0:
            return
        deadline = time.monotonic() + seconds
        with self.cond:
            while self.run_requested and not self.exiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    @property
    def throttle_percentage(self) -> int:
        return self._throttle

    def throttle(self, pct: int) -> None:
        """Each vCPU sleeps pct/(1-pct) x 10 ms after every 10 ms slice (0 = off, max 99)."""
        if not 0 <= pct <= 99:
            raise ValueError(f"throttle percentage {pct} out of range 0..99")
        self._throttle = int(pct)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Make every vCPU thread exit and join it."""
        with self.cond:
            self.exiting = True
            self.run_requested = False
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        for v in self._vcpus:
            if v.thread.is_alive():
                v.thread.join(max(0.0, deadline - time.monotonic()))
