"""The migration thread: one OS thread per outgoing migration (QEMU's ``migration_thread``).

It takes the big lock only where the machine must hold still — stream header and setup, each dirty
bitmap sync, stopping the guest, saving device state — and never while it writes to the channel, so
the event loop (QMP, HTTP) keeps answering, through the switch-over included.

The loop is QEMU's control law (reference §1.4–1.6): cheap pending estimate; exact pending (a bitmap
sync) only when the estimate is below the threshold; switch over when pending <= threshold; otherwise
iterate while the 100 ms window has budget and sleep to its end. Every >= 100 ms the bandwidth, the
threshold, ``mbps`` and ``expected-downtime`` are recomputed from bytes really written.

Deliberate differences from QEMU, all about telling the truth on downtime:
- the threshold reserves the switch-over's fixed costs (stopping vCPUs, drain, devices, EOF, the
  destination's acknowledgement: learned from the previous completed migration, 20 ms before any),
  counts on the slowest of the last five windows rather than the last one, only on half of it (a final
  pass here can run at half the speed of the windows before it), and, once a final pass was measured,
  never on more bandwidth than that final pass really had;
- below the threshold, the switch-over still waits while each live round halves what is left (the
  limit is a ceiling, not a target: QEMU here spends almost its whole 300 ms stopped);
- with a return path, the switch-over waits (guest still running) until the destination answered a
  PING, so data sitting in socket buffers is loaded before the downtime starts, not during it;
- ``expected-downtime`` is ``fixed costs + remaining / bandwidth`` from the first window on: the downtime
  a switch-over started now would cost. QEMU only updates it after a second bitmap sync, so it shows the
  limit itself during the whole first pass. Ours reaches the limit exactly when the switch-over is decided.

The completion is timed phase by phase (``x-migd-downtime-phases``); consecutive phases share their
boundaries, so they add up to ``downtime``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import Protocol

from migd.bql import BQL
from migd.machine.runstate import LIVE_STATES, RunState
from migd.migration.format import Cmd, command
from migd.migration.host import MigrationHost
from migd.migration.multifd import MultifdSender
from migd.migration.params import MigrationConfig
from migd.migration.ram import RAMError
from migd.migration.returnpath import ReturnPathReader, sibling_error
from migd.migration.savevm import SaveVM
from migd.migration.stats import MigrationStats
from migd.migration.status import MigrationStatus as M
from migd.migration.stream import OutStream, StreamError
from migd.migration.throttle import AutoConverge
from migd.threads import any_thread, on_thread
from migd.transports.channel import Channel

log = logging.getLogger("migd.migration")

WINDOW = 0.1  # seconds: QEMU's BUFFER_DELAY
DEFAULT_OVERHEAD_MS = 20.0  # fixed switch-over cost assumed before one was measured
MIN_FINAL_PASS_BYTES = 8 << 20  # a final pass smaller than this says nothing about bandwidth
ACK_TIMEOUT = 600.0  # seconds to wait for the destination's SHUT (a cancel ends the wait at once)
# While a migration runs, the GIL changes hands every 1 ms instead of 5: the event loop needs it a few
# times per QMP answer, and the page loop would otherwise make each of those waits up to 5 ms long.
SWITCH_INTERVAL = 0.001
PONG_TIMEOUT = 30.0  # seconds a catch-up PING may take before the switch-over goes ahead anyway
BW_HISTORY = 5  # windows: the switch-over counts on the slowest of the last 0.5 s
# The final pass may run at half the speed measured just before it (measured on this noisy 2-core
# kind of machine: other processes take the CPU at any moment), so a measured bandwidth is only half
# trusted for the decision. A user-given avail-switchover-bandwidth is trusted as given.
SWITCHOVER_SAFETY = 0.5
# With auto-converge, a bitmap sync at least this often once past the first pass (QEMU's
# CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS): throttling is decided at syncs, which are otherwise rare
# while a big dirty set is still far above the threshold.
THROTTLE_SYNC_INTERVAL = 5.0
# The downtime-limit is a ceiling, not a target: while each live round still halves what is left,
# another round costs the guest nothing, so the switch-over waits until the rest is this small a
# fraction of what the limit allows, or until rounds stop converging.
TINY_FRACTION = 0.05


class SourceSide(Protocol):
    """What the thread reads from and publishes into (``state.MigrationState`` on the loop side)."""

    host: MigrationHost
    config: MigrationConfig
    stats: MigrationStats
    stream: OutStream | None
    channel: Channel | None
    continue_event: threading.Event  # QEMU's pause_sem: migrate-continue or a cancel
    wake_event: threading.Event  # breaks the rate-limit sleep
    start_time: float
    setup_time: int
    total_time: int
    downtime: int
    expected_downtime: int
    downtime_phases: dict[str, float]
    throttle_percentage: int
    overhead_ms_hint: float
    final_bw_hint: float

    @property
    def status(self) -> M: ...

    def set_state(self, old: M | Collection[M], new: M) -> bool: ...

    def fail(self, desc: str, old: M | Collection[M] | None = None) -> bool: ...

    def thread_exited(self, thread: MigrationThread) -> None: ...


class MigrationFailed(Exception):
    """Ends the migration as failed with ``str()`` as error-desc."""


class Cancelled(Exception):
    """The state left the expected one (a cancel won the race): wind down without failing."""


class PhaseClock:
    """Downtime phases measured back to back from one start, so they add up to the total."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._last = self.start
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> float:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._last) * 1000
        self._last = now
        return now

    def total_ms(self) -> float:
        return (self._last - self.start) * 1000


class MigrationThread(threading.Thread):
    """Runs one migration from setup to a terminal state; publishes counters into MigrationState."""

    def __init__(self, ms: SourceSide) -> None:
        super().__init__(name="mig/src/main", daemon=True)
        self.ms = ms
        self.machine = ms.host.machine
        self.runstate = ms.host.runstate
        assert ms.stream is not None and ms.channel is not None
        self.stream = ms.stream
        self.channel = ms.channel
        self.stats: MigrationStats = ms.stats
        self.use_return_path = bool(ms.config.cap("return-path") and self.channel.has_return_path)
        self.rp: ReturnPathReader | None = None
        self.savevm: SaveVM | None = None
        self.multifd: MultifdSender | None = None
        self.throttle = (AutoConverge(self.machine.vcpus, lambda: ms.config.params)
                         if ms.config.cap("auto-converge") else None)
        self._rate_lock = threading.Lock()
        self._unlimited = False
        # control law
        self.threshold = 0.0  # bytes
        self.bandwidth = 0.0  # bytes/ms over the last window
        self._iter_start = 0.0
        self._iter_bytes = 0
        self._iter_pages = 0
        self._pre_sync_dirty = 0
        self._last_sync = time.monotonic()
        self._completing = False
        self._bw_history: deque[float] = deque(maxlen=BW_HISTORY)
        self._ping = 1  # PING 1 goes out with the header
        self._dest_synced = False
        self._round: tuple[int, int] | None = None  # (pending, transferred) when the round began
        # what completion changed, to undo on failure/cancel
        self._vm_stopped = False
        self._vm_was_live = False
        self._vm_old_state: RunState | None = None
        self._drives_inactive = False

    # -- called from other threads --------------------------------------------------------------

    @any_thread
    def apply_rate_limit(self) -> None:
        """max-bandwidth -> stream budget, at once; ignored after the switch-over (unlimited)."""
        with self._rate_lock:
            if not self._unlimited:
                self.stream.set_rate_limit(int(self.ms.config.param("max-bandwidth")))

    def _set_unlimited(self) -> None:
        with self._rate_lock:
            self._unlimited = True
            self.stream.set_rate_limit(0)

    @on_thread("mig/src/main")
    def on_sync(self, stats: MigrationStats) -> None:
        """After each bitmap sync: feed auto-converge with the newly dirtied pages."""
        self._last_sync = time.monotonic()
        if self.throttle is None or self._completing:
            return
        new_pages = max(0, stats.dirty_pages - self._pre_sync_dirty)
        self.throttle.note_sync(new_pages, self.stream.transferred, stats.page_size, time.monotonic())
        self.ms.throttle_percentage = self.throttle.percentage

    # -- the thread -----------------------------------------------------------------------------

    @on_thread("mig/src/main")
    def run(self) -> None:
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(old_interval, SWITCH_INTERVAL))
        try:
            self._migrate()
        except Cancelled:
            pass
        except MigrationFailed as exc:
            self.ms.fail(str(exc))
        except (StreamError, RAMError, OSError) as exc:  # channel gone, RAM block removed, I/O error
            self.ms.fail(self._peer_error() or self.stream.error or str(exc) or type(exc).__name__)
        except Exception as exc:  # a bug: report it, and never leave the state running
            log.exception("migration thread failed")
            self.ms.fail(self.stream.error or f"Migration thread error: {exc or type(exc).__name__}")
        finally:
            try:
                self._finish()
            finally:
                sys.setswitchinterval(old_interval)
                self.ms.thread_exited(self)

    def _peer_error(self) -> str | None:
        """The destination's own verdict, when it sent SHUT(error) before we finished."""
        rp = self.rp
        if rp is not None and rp.shut:
            return sibling_error(rp.shut)
        return None

    def _expect(self, status: M) -> None:
        if self.ms.status is not status:
            raise Cancelled()
        peer = self._peer_error()
        if peer is not None:
            raise MigrationFailed(peer)
        if self.stream.error is not None:
            raise MigrationFailed(self.stream.error)

    def _migrate(self) -> None:
        ms, stream = self.ms, self.stream
        setup_start = time.monotonic()
        self.savevm = savevm = SaveVM(self.machine, self.stats, self.use_return_path)
        if ms.config.cap("multifd"):  # the extra channels, before the stream begins (QEMU's order)
            self.multifd = savevm.ram.pages_out = MultifdSender.open(self.channel, stream, ms.config.params)
        with BQL:
            self._expect(M.SETUP)
            savevm.save_header(stream)
            savevm.save_setup(stream)
        stream.flush()
        if self.use_return_path:
            self.rp = ReturnPathReader(self.channel)
            self.rp.start()
        if not ms.set_state(M.SETUP, M.ACTIVE):
            raise Cancelled()
        ms.setup_time = int((time.monotonic() - setup_start) * 1000)
        self._new_window(time.monotonic())
        while True:
            self._expect(M.ACTIVE)
            if not stream.rate_limit_exceeded():
                pending = savevm.pending_estimate()
                if pending <= self.threshold or self._throttle_sync_due():
                    self._pre_sync_dirty = self.stats.dirty_pages
                    with BQL:
                        pending = savevm.pending_exact()
                    self._publish_expected_downtime(pending)
                if pending > self.threshold:
                    self._round = None
                elif self._converged(pending):
                    if self.rp is not None and not self._dest_synced:
                        self._catch_up()
                        continue  # re-evaluate with a fresh sync: the guest ran meanwhile
                    self._complete()
                    return
                savevm.save_iterate(stream)
                self._dest_synced = False
            self._rate_limit()

    def _throttle_sync_due(self) -> bool:
        return (self.throttle is not None and self.stats.dirty_sync_count > 1
                and time.monotonic() - self._last_sync >= THROTTLE_SYNC_INTERVAL)

    def _converged(self, pending: int) -> bool:
        """Below the threshold: switch over now, or first send one more round with the guest running?

        A round is the pending bytes of its start, sent once. If the round after it was at most half as
        big, the guest dirties slowly enough that another round shrinks the final pass further, at no
        cost in downtime; stop when the rest is tiny or a round no longer halves it.
        """
        if pending == 0 or pending <= self.threshold * TINY_FRACTION:
            return True
        sent = self.stream.transferred
        if self._round is None:
            self._round = (pending, sent)
            return False
        start_pending, start_sent = self._round
        if sent - start_sent < start_pending:
            return False  # this round is still being sent
        if pending <= start_pending / 2:
            self._round = (pending, sent)
            return False
        return True

    def _catch_up(self) -> None:
        """PING the destination and wait for its PONG while the guest still runs.

        Bytes count as transferred once the kernel took them, but socket buffers hold megabytes —
        millions of ZERO records — that the destination has not loaded yet. Without this, that backlog
        would be loaded during the downtime (as wait-ack). Not QEMU's behaviour: a migd addition.
        """
        assert self.rp is not None
        self._ping += 1
        t0 = time.monotonic()
        self.stream.put(command(Cmd.PING, self._ping.to_bytes(4, "big")))
        self.stream.flush()
        ok = self.rp.wait_for_pong(self._ping, PONG_TIMEOUT)
        self._expect(M.ACTIVE)
        if not ok and (self.rp.error is not None or self.rp.shut is not None):
            raise MigrationFailed(self.rp.error or sibling_error(self.rp.shut or 1))
        log.info("migration catch-up: destination answered PING %d after %.1f ms%s", self._ping,
                 (time.monotonic() - t0) * 1000, "" if ok else " (timed out)")
        self._dest_synced = True
        self._new_window(time.monotonic())  # the wait says nothing about the channel's bandwidth

    # -- counters (QEMU's migration_update_counters / migration_rate_limit) -----------------------

    def _new_window(self, now: float) -> None:
        self._iter_start = now
        self._iter_bytes = self.stream.transferred
        self._iter_pages = self.stats.normal + self.stats.duplicate
        self.stream.reset_window()

    def _overhead_ms(self) -> float:
        hint = self.ms.overhead_ms_hint
        return hint if hint > 0 else DEFAULT_OVERHEAD_MS

    def _switchover_bandwidth(self) -> float:
        """Bytes/ms a switch-over could count on: avail-switchover-bandwidth if set, else the slowest
        recent window (single windows swing 2-3x with socket buffering and CPU contention), capped by
        the final-pass bandwidth measured last time."""
        avail = int(self.ms.config.param("avail-switchover-bandwidth"))
        if avail:
            return avail / 1000
        bw = min(self._bw_history) if self._bw_history else self.bandwidth
        final = self.ms.final_bw_hint
        return min(bw, final) if final > 0 else bw

    def _rate_limit(self) -> None:
        now = time.monotonic()
        if now - self._iter_start >= WINDOW:
            self._update_counters(now)
        if self.stream.rate_limit_exceeded() and self.stream.error is None:
            delay = self._iter_start + WINDOW - time.monotonic()
            if delay > 0:
                self.ms.wake_event.wait(delay)

    def _update_counters(self, now: float) -> None:
        stats = self.stats
        transferred = self.stream.transferred - self._iter_bytes
        spent_ms = (now - self._iter_start) * 1000
        self.bandwidth = transferred / spent_ms
        if transferred > 10000:
            self._bw_history.append(self.bandwidth)
        bw = self._switchover_bandwidth()
        limit_ms = int(self.ms.config.param("downtime-limit"))
        overhead = self._overhead_ms()
        trust = 1.0 if int(self.ms.config.param("avail-switchover-bandwidth")) else SWITCHOVER_SAFETY
        self.threshold = bw * trust * max(0.0, limit_ms - overhead)
        stats.mbps = transferred * 8 / (spent_ms / 1000) / 1e6
        pages = stats.normal + stats.duplicate
        stats.pages_per_second = int((pages - self._iter_pages) / (spent_ms / 1000))
        if transferred > 10000:
            self._publish_expected_downtime(stats.remaining)
        self._new_window(now)

    def _publish_expected_downtime(self, pending: int) -> None:
        """Fixed switch-over costs + pending / bandwidth: the downtime of a switch-over started now.

        Before the first 100 ms window closed there is no window bandwidth: nothing pending then costs
        only the fixed part, and anything else is judged on the average since the migration began
        (leaving the downtime limit, QEMU's first guess, in place would report 300 for a 2 ms stop).
        """
        bw = self._switchover_bandwidth()
        if bw <= 0 and pending:
            elapsed_ms = (time.monotonic() - self.ms.start_time) * 1000
            bw = self.stream.transferred / elapsed_ms if elapsed_ms > 0 else 0.0
        if pending == 0:
            self.ms.expected_downtime = int(self._overhead_ms())
        elif bw > 0:
            self.ms.expected_downtime = int(self._overhead_ms() + pending / bw)

    # -- completion (QEMU's migration_completion_precopy, reordered for downtime) -------------------

    def _complete(self) -> None:
        ms, machine, stream = self.ms, self.machine, self.stream
        self._completing = True
        log.info("migration switch-over: pending=%d threshold=%d expected_downtime=%d",
                 self.stats.remaining, int(self.threshold), ms.expected_downtime)
        with BQL:  # flush while the guest still runs: the slow part of a flush stays out of downtime
            machine.flush_drives()
        with BQL:
            self._expect(M.ACTIVE)
            clock = PhaseClock()  # downtime starts
            self._vm_old_state = self.runstate.state
            self._vm_stopped = True
            self._vm_was_live = self.runstate.is_live()
            # a cancel wakes this wait (a vCPU that never acknowledges must not wedge the cancel)
            machine.vm_stop_force_state(RunState.FINISH_MIGRATE, abort=lambda: ms.status is not M.ACTIVE)
            self._expect(M.ACTIVE)
            clock.mark("stop-vcpus")
            machine.drain_drives()
            machine.flush_drives()
            clock.mark("drain-flush")
        if ms.config.cap("pause-before-switchover"):
            ms.continue_event.clear()
            if not ms.set_state(M.ACTIVE, M.PRE_SWITCHOVER):
                raise Cancelled()
            ms.continue_event.wait()  # migrate-continue or migrate_cancel; the BQL is not held
            clock.mark("pre-switchover")
            if not ms.set_state(M.PRE_SWITCHOVER, M.DEVICE):
                raise Cancelled()
        elif not ms.set_state(M.ACTIVE, M.DEVICE):
            raise Cancelled()
        with BQL:
            machine.inactivate_drives()
            self._drives_inactive = True
        self._set_unlimited()
        clock.mark("inactivate-drives")
        downtime_bytes0 = self.stats.downtime_bytes
        self._final_pass(clock)
        ram_final_ms = clock.phases.get("ram-final", 0.0)
        if self.rp is not None:
            self._expect(M.DEVICE)
            try:
                flag = self.rp.wait_for_shut(ACK_TIMEOUT)
            except Exception as exc:
                self._expect(M.DEVICE)
                raise MigrationFailed(str(exc)) from exc
            if flag:
                raise MigrationFailed(sibling_error(flag))
            clock.mark("wait-ack")
        with BQL:
            end = time.monotonic()
            self._expect(M.DEVICE)
            ms.downtime = int(round(clock.total_ms()))
            ms.downtime_phases = {k: round(v, 3) for k, v in clock.phases.items()}
            ms.total_time = int((end - ms.start_time) * 1000)
            moving_ms = ms.total_time - ms.setup_time
            if moving_ms > 0:
                self.stats.mbps = stream.transferred * 8 / moving_ms / 1000
            if not ms.set_state(M.DEVICE, M.COMPLETED):
                raise Cancelled()
            self.runstate.set(RunState.POSTMIGRATE)
        # what this switch-over taught us, for the next decision
        ms.overhead_ms_hint = max(1.0, clock.total_ms() - ram_final_ms - clock.phases.get("pre-switchover", 0.0))
        final_bytes = self.stats.downtime_bytes - downtime_bytes0
        if final_bytes >= MIN_FINAL_PASS_BYTES and ram_final_ms > 0:
            ms.final_bw_hint = final_bytes / ram_final_ms
        log.info("migration completed: downtime=%d ms phases=%s total=%d ms", ms.downtime,
                 ms.downtime_phases, ms.total_time)

    def _final_pass(self, clock: PhaseClock) -> None:
        """Rest of RAM (no rate limit), device state, EOF and description, flushed."""
        savevm, stream = self.savevm, self.stream
        assert savevm is not None  # made in setup, before any switch-over
        savevm.save_complete_ram(stream)
        stream.flush()
        clock.mark("ram-final")
        with BQL:  # devices are read while nothing else may touch them
            savevm.save_complete_devices(stream)
        clock.mark("device-state")
        savevm.save_eof(stream)
        stream.flush()
        clock.mark("eof-flush")

    # -- the end, whatever it was (QEMU's migration_iteration_finish) -----------------------------

    def _finish(self) -> None:
        ms, machine = self.ms, self.machine
        if self.throttle is not None:
            self.throttle.stop()
        ms.throttle_percentage = 0
        if ms.status is not M.COMPLETED:
            with BQL:
                if self._drives_inactive:
                    try:
                        machine.activate_drives()
                    except Exception as exc:
                        log.error("re-activating drives after a failed migration: %s", exc)
                    self._drives_inactive = False
                if self._vm_stopped:
                    state = self.runstate.state
                    if self._vm_was_live and state is not RunState.SHUTDOWN:
                        machine.vm_start()
                    elif state is RunState.FINISH_MIGRATE and self._vm_old_state is not None \
                            and self._vm_old_state not in LIVE_STATES:
                        self.runstate.set(self._vm_old_state)
        if self.rp is not None:
            self.rp.close()
        if self.multifd is not None:
            self.multifd.close(drain=ms.status is M.COMPLETED)
        if self.savevm is not None:
            try:
                with BQL:
                    self.savevm.cleanup()
            except Exception as exc:
                log.error("migration cleanup: %s", exc)
