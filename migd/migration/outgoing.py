"""The migration thread: one OS thread per outgoing migration (QEMU's ``migration_thread``).

It takes the big lock only where the machine must hold still — stream header and setup, each dirty
bitmap sync, stopping the guest, saving device state — and never while it writes to the channel, so
the event loop (QMP, HTTP) keeps answering, through the switch-over included.

The loop is QEMU's control law with the decisions moved into a pure ``SwitchoverPolicy``
(``migration/policy.py``, docs/SWITCHOVER.md §1): this thread only measures — bytes, time inside
channel writes and time asleep per >= 100 ms window, dirty pages per bitmap sync, PING round trips,
the cost of a device-state dry run at setup — and executes what the policy answers (iterate, sync,
switch over, throttle, abort). ``expected-downtime`` is the policy's ``fixed costs + final pass /
final-pass rate`` (the final pass the policy plans; at the switch-over, the remaining) from the first
window on, the same number in the log and in ``query-migrate``.

With a return path a PING goes out about once a second and its PONG is only *timed* (an input of the
model: the destination's round trip, queueing behind the stream included). Only the first switch-over
waits until one PING was answered (in bounded waits, the guest running, given up after PONG_TIMEOUT);
no window is restarted by it, so a 100 ms round trip cannot stall a migration. A migd destination
that accepted LOAD_PACE reports its load pace on the return path; each loop turn hands the new
reports to the policy (the drain rate of the socket's backlog, a bound on the final pass's rate).

The completion is the commit protocol of docs/SWITCHOVER.md §2 between migd peers (LOADED, then the
point of no return ``ms.commit()``, then COMMIT, then SHUT): before it every failure resumes the guest,
after it nothing does. With a destination that did not accept it, the point of no return is the EOF
(such a destination may run as soon as it has everything). Heartbeats (``heartbeat.py``) go out while
the thread waits with the stream idle, and a destination silent for ``x-migd-peer-timeout`` fails the
migration.

The completion is timed phase by phase (``x-migd-downtime-phases``); consecutive phases share their
boundaries, so they add up to ``downtime``.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Collection
from contextlib import nullcontext
from typing import Any, Protocol

from migd.bql import BQL
from migd.machine.runstate import LIVE_STATES, RunState
from migd.migration import policytrace
from migd.migration.foreign_save import RAM_WAIT, savevm_for
from migd.migration.format import (
    CMD_X_MIGD_COMMIT,
    CMD_X_MIGD_HEARTBEAT,
    FEATURE_CHECKSUM,
    FEATURE_COMMIT,
    FEATURE_HEARTBEAT,
    FEATURE_LOAD_PACE,
    FEATURE_PAGE_RUNS,
    FEATURES_SUPPORTED,
    Cmd,
    command,
)
from migd.migration.heartbeat import IdleStream, Watchdog, beat_interval
from migd.migration.host import MigrationHost
from migd.migration.multifd import MultifdSender, Secure
from migd.migration.params import MigrationConfig
from migd.migration.policy import Action, Convergence, Decision, Step, SwitchoverPolicy
from migd.migration.ram import RAMError
from migd.migration.returnpath import ReturnPathReader, sibling_error
from migd.migration.savevm import SaveVM
from migd.migration.stats import MigrationStats
from migd.migration.status import MigrationStatus as M
from migd.migration.stream import SPLICE_MIN, OutStream, StreamError
from migd.migration.throttle import AutoConverge
from migd.priority import lower_this_thread
from migd.switching import fast_switching
from migd.threads import any_thread, loop_only, on_thread
from migd.transports.channel import Channel
from migd.transports.sendqueue import queued_bytes
from migd.transports.tcp import set_peer_timeout
from migd.transports.uri import MigrationURI
from migd.units import PAGE_SIZE

log = logging.getLogger("migd.migration")

WINDOW = 0.1  # seconds: QEMU's BUFFER_DELAY
ACK_TIMEOUT = 600.0  # seconds to wait for the destination's SHUT (a cancel ends the wait at once)
PING_INTERVAL = 1.0  # seconds between PINGs that time the destination's round trip
DRY_RUNS = 3  # device-state dry runs at setup, the least counted
PONG_TIMEOUT = 30.0  # seconds after which an unanswered PING is given up and another one sent
DRAIN_STEP_S = 0.1  # s one DRAIN waits at most before the policy decides again
DRAIN_POLL_S = 0.001  # s between looks at the socket's queue while draining
DRAIN_PONG_WAIT = 0.05  # s a drained socket's PING waits at most for its PONG
HELD_WAIT = 0.5  # s a PONG's round trip waits at most for the LOAD_PACE report that follows it
# s a failed write waits at most for the return path to deliver the destination's SHUT or end: a
# destination that refuses sends SHUT(1) before it closes, and the write can fail before it is read
VERDICT_WAIT_S = 1.0
RUN_MARKS = 512  # batches whose end offsets and run counts map LOAD_PACE spans to the runs they loaded
# the switch-over's framing outside RAM and devices (state changes, events, EOF) on top of the
# measured VMDESCRIPTION build: a small constant, measured once on this kind of machine
FRAMING_MS = 0.5


class SourceSide(Protocol):
    """What the thread reads from and publishes into (``state.MigrationState`` on the loop side)."""

    host: MigrationHost
    config: MigrationConfig
    address: MigrationURI | None  # where the main channel went (multifd opens its channels there too)
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
    convergence: dict[str, Any]  # x-migd-convergence, published at every sync
    policy_actions: list[dict[str, Any]]
    error_desc: str | None
    committed: bool  # past the point of no return (docs/SWITCHOVER.md §2)

    @property
    def status(self) -> M: ...

    def set_state(self, old: M | Collection[M], new: M) -> bool: ...

    def fail(self, desc: str, old: M | Collection[M] | None = None) -> bool: ...

    def commit(self) -> bool: ...

    def thread_exited(self, thread: MigrationThread) -> None: ...

    def multifd_secure(self) -> Secure | None: ...


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
        # control law: measurements go to the policy, its answers are executed here
        self.policy = SwitchoverPolicy(lambda: ms.config.params, 0, ms.start_time,
                                       peer_answers=self.use_return_path)
        policytrace.start(self.policy)  # MIGD_POLICY_TRACE: record the inputs, for a replay
        self._switch_pending: int | None = None  # remaining at the switch-over decision
        self.threshold = 0.0  # bytes, as the policy last computed it
        self.bandwidth = 0.0  # bytes/ms over the last window
        self._iter_start = 0.0
        self._iter_bytes = 0
        self._iter_busy = 0.0
        self._iter_sleep = 0.0
        self._iter_save = 0.0
        self._iter_runs = 0
        # (stream bytes written, runs of data pages sent) after each batch: which runs a LOAD_PACE
        # span of the destination loaded (the destination's cost of a page run is its own)
        self._run_marks: deque[tuple[int, int]] = deque(maxlen=RUN_MARKS)
        self._iter_pages = 0
        self._iter_cpu = 0.0  # the thread's CPU time at the window's start
        self._final_cpu_ms: float | None = None
        self._stop_gap_ms: float | None = None  # from the switch-over's start to the vCPU stop's (trace)
        self._final_write_ms: float | None = None
        self._final_bytes: int | None = None
        self._pre_sync_dirty = 0
        self._sync_dirtied: int | None = None  # the dirty log's bytes just before a sync's take
        self._completing = False
        self._ping = 1  # PING 1 goes out with the header
        self._paces_seen = 0  # LOAD_PACE reports handed to the policy so far
        self._held: dict[int, float] = {}  # PING value -> s the destination held it (its LOAD_PACE report)
        # (value, time, bytes just before it, bytes queued in the socket ahead of it, s the burst took, sent as a DRAIN ended)
        self._ping_sent: tuple[int, float, int, int, float, bool] | None = None
        self._last_ping = 0.0
        self._last_probe = 0.0  # when the last PING that follows a burst went out
        self._slept = False  # the thread slept on the rate limit since the last burst
        self._computed_throttle = 0  # % set by the built-in policy (auto-converge off)
        self._published_state: Convergence | None = None  # the convergence state last announced
        # what completion changed, to undo on failure/cancel
        self._vm_stopped = False
        self._vm_was_live = False
        self._vm_old_state: RunState | None = None
        self._drives_inactive = False
        # commit protocol and heartbeats
        self._beat: IdleStream | None = None
        self._watchdog: Watchdog | None = None
        self._silence: str | None = None  # why the destination was given up on
        # past the commit point, but the destination provably will not run (it said SHUT(error), or
        # not one byte of the COMMIT left): resuming is safe
        self._peer_refused = False

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

    @any_thread
    def peer_silent_ms(self) -> int | None:
        """How long the destination has been silent, once heartbeats were agreed."""
        rp = self.rp
        if rp is None or self._watchdog is None or rp.features is None or not rp.features & FEATURE_HEARTBEAT:
            return None
        return int(rp.silent_for() * 1000)

    @on_thread("mig/src/main")
    def on_sync(self, stats: MigrationStats) -> None:
        """After each bitmap sync (migration thread): feed the policy and auto-converge, publish."""
        if self._completing:
            return
        now = time.monotonic()
        new_pages = max(0, stats.dirty_pages - self._pre_sync_dirty)
        self.policy.on_sync(now, stats.remaining, new_pages * stats.page_size, self._sync_dirtied)
        self._sync_dirtied = None
        self._publish_expected_downtime(stats.remaining)
        self._publish_forecast(now)
        if self.throttle is not None:
            self.throttle.note_sync(new_pages, self.stream.transferred, stats.page_size, now)
            self.ms.throttle_percentage = self.throttle.percentage

    # -- the thread -----------------------------------------------------------------------------

    @on_thread("mig/src/main")
    def run(self) -> None:
        try:
            with fast_switching():  # the GIL changes hands every 1 ms, not 5 (migd/switching.py)
                self._run()
        finally:
            self.ms.thread_exited(self)

    def _run(self) -> None:
        """The migration and its wind-down (migration thread)."""
        try:
            self._migrate()
        except Cancelled:
            pass
        except MigrationFailed as exc:
            self.ms.fail(str(exc))
        except (StreamError, RAMError, OSError) as exc:  # channel gone, RAM block removed, I/O error
            self.ms.fail(self._peer_error(after_write_error=True) or self.stream.error or str(exc)
                         or type(exc).__name__)
        except Exception as exc:  # a bug: report it, and never leave the state running
            log.exception("migration thread failed")
            self.ms.fail(self.stream.error or f"Migration thread error: {exc or type(exc).__name__}")
        finally:
            self._unthrottle()
            self._finish()

    @loop_only
    def release(self) -> None:
        """After the join: drop the parts that point back at this thread (the watchdog's and the
        return path's callbacks are its bound methods), so that the thread, its stream buffers and
        the RAM saver's bitmaps are freed when the last reference goes, not at the next full garbage
        collection (a soak's RSS rose by the stream buffers of every migration in between)."""
        self._watchdog = None
        self._beat = None
        self.rp = None
        self.savevm = None
        self.multifd = None

    def _peer_error(self, after_write_error: bool = False) -> str | None:
        """The destination's own verdict (SHUT(error)), or the watchdog's on a silent destination.
        ``after_write_error``: when the stream failed, first let the return path deliver a SHUT the
        destination sent before it closed (VERDICT_WAIT_S at most, the reader ending sooner on EOF):
        its reason, not the broken pipe it caused (migration thread)."""
        rp = self.rp
        if after_write_error and rp is not None and self.stream.error is not None and rp.shut is None:
            rp.wait_for(lambda: rp.shut is not None, VERDICT_WAIT_S)
        if rp is not None and rp.shut:
            return sibling_error(rp.shut)
        return self._silence

    def _expect(self, status: M) -> None:
        if self.ms.status is not status:
            raise Cancelled()
        peer = self._peer_error(after_write_error=True)
        if peer is not None:
            raise MigrationFailed(peer)
        if self.stream.error is not None:
            raise MigrationFailed(self.stream.error)

    def _migrate(self) -> None:
        """Setup, then the loop: measure, ask the policy, execute (migration thread)."""
        ms, stream, policy = self.ms, self.stream, self.policy
        setup_start = time.monotonic()
        held = ms.host.held_machine()
        if held is not None:  # a relay: the incoming block list first, outside the big lock; a cancel ends the wait
            held.wait_ram(RAM_WAIT, given_up=lambda: ms.status is not M.SETUP)
            self._expect(M.SETUP)
        self.savevm = savevm = savevm_for(held, self.machine, self.stats, self.use_return_path,
                                          *self._announce())
        if ms.config.cap("multifd") and held is None:  # before the stream (QEMU's order)
            self.multifd = savevm.ram.pages_out = MultifdSender.open(ms.address, stream, ms.config.params,
                                                                     ms.multifd_secure(),
                                                                     zero_copy=ms.config.cap("zero-copy-send"))
        with BQL:
            self._expect(M.SETUP)
            savevm.save_header(stream)
            savevm.save_setup(stream)
            self._dry_run(savevm)
        stream.flush()
        policy.ram_total = self.stats.total
        if self.use_return_path:
            self.rp = ReturnPathReader(self.channel)
            self.rp.start()
            self._start_watchdog()
            savevm.ram.page_runs = self._page_runs
        if not ms.set_state(M.SETUP, M.ACTIVE):
            raise Cancelled()
        ms.setup_time = int((time.monotonic() - setup_start) * 1000)
        lower_this_thread()  # the control plane wins the CPU (migd/priority.py); helpers started above
        self._new_window(time.monotonic())
        while True:
            self._expect(M.ACTIVE)
            self._take_paces()
            self._time_pong()
            if not stream.rate_limit_exceeded():
                self._send_ping()
                pending = savevm.pending_estimate()
                decision = self._decide(pending, exact=False)
                if decision.step is Step.SYNC:
                    decision = self._decide(self._sync(), exact=True)
                if decision.step is Step.SWITCHOVER and savevm.switchover_ready() or savevm.switchover_due():
                    log.info("migration switch-over decided: pending=%d expected_downtime=%d final-rate=%.0f MB/s "
                             "fixed=%s", self.stats.remaining, ms.expected_downtime, policy.final_rate() / 1e6,
                             {k: round(v, 2) for k, v in policy.fixed_parts().items()})
                    self._complete()
                    return
                if decision.step is Step.DRAIN:
                    self._drain(policy.drain_target())
                    continue  # nothing sent meanwhile: sync and decide again
                if policy.waiting_for_peer:
                    self._wait_pong(WINDOW / 10)
                before, pages, burst_start = stream.transferred, self._pages(), time.monotonic()
                copied = savevm.ram.live_copy_s
                savevm.save_iterate(stream)
                self._run_marks.append((stream.transferred, savevm.ram.runs_sent))
                # the page work a final pass repeats: not the staging copies it does not make
                self._iter_save += time.monotonic() - burst_start - (savevm.ram.live_copy_s - copied)
                burst = stream.transferred - before
                if burst >= (self._pages() - pages) * self.stats.page_size / 2:  # data pages, as the final pass
                    self._send_ping(behind=burst, since=burst_start)
                self._slept = False
            self._rate_limit()

    def _dry_run(self, savevm: SaveVM) -> None:
        """Time what the switch-over will do outside RAM, without doing it: every device's save and
        the VMDESCRIPTION (migration thread, BQL held)."""
        device = other = float("inf")
        for _ in range(DRY_RUNS):  # the least of a few: one descheduled run measured 216 ms for 0.2
            t0 = time.monotonic()
            for dev in self.machine.devices():
                dev.save()
            t1 = time.monotonic()
            savevm.vmdesc()
            t2 = time.monotonic()
            device, other = min(device, t1 - t0), min(other, t2 - t1)
        self.policy.on_phase("device-state", device * 1000)
        self.policy.on_phase("other", other * 1000 + FRAMING_MS)

    def _drain(self, target: int) -> None:
        """(migration thread) Let the destination load what the socket holds while the guest still
        runs: wait, the stream idle, until at most ``target`` bytes are queued (DRAIN_STEP_S at most,
        a cancel or a failure ends it at once; the policy bounds the drains of one switch-over)."""
        deadline = time.monotonic() + DRAIN_STEP_S
        with self._idle():
            while (self._backlog() > target and time.monotonic() < deadline
                   and self.ms.status is M.ACTIVE and self._silence is None):
                time.sleep(DRAIN_POLL_S)
        if self._backlog() <= target:
            # drained: a round trip now is the one the switch-over will find (a busy destination
            # answered the PINGs before it several times slower); waited for, briefly, as is a
            # PING still out before it (one PING is out at a time)
            if self._ping_sent is not None:
                self._wait_pong(DRAIN_PONG_WAIT)
            if self._ping_sent is None:
                self._send_ping(drained=True)
                self._wait_pong(DRAIN_PONG_WAIT)

    def _backlog(self) -> int:
        """(migration thread) Bytes the sockets hold that the destination has not read: the main
        channel's, and with multifd its channels' too (the final pass's pages wait behind them: an
        idle guest over a 1 Gbit/s link, multifd 2, expected 22 ms for 112 when only the main
        channel counted)."""
        queued = queued_bytes(self.channel)
        return queued + self.multifd.queued_bytes() if self.multifd is not None else queued

    def _sync(self) -> int:
        """A bitmap sync, timed (the final pass starts with one): the exact pending bytes. Its cost
        is the thread's CPU time: a sync while the guest runs waits for the big lock and for the
        vCPUs' share of the interpreter, the final one (vCPUs stopped) does not (64M unlimited: the
        sync ending the first pass took 11.2 ms, the final one 1.0)."""
        self._pre_sync_dirty = self.stats.dirty_pages
        t0, cpu0 = time.monotonic(), time.thread_time()
        assert self.savevm is not None  # made in setup
        self._sync_dirtied = self.savevm.unsynced_bytes()  # the dirty log just before its take
        with BQL:
            pending = int(self.savevm.pending_exact())
        self.policy.on_phase("sync", min(time.monotonic() - t0, time.thread_time() - cpu0) * 1000)
        if pending <= 2 * self.threshold:  # near a switch-over only
            runs, share = self.savevm.ram.dirty_layout(SPLICE_MIN // PAGE_SIZE)
            self.policy.on_layout(pending, runs, share if self._final_by_reference() else 0.0)
        return pending

    def _final_by_reference(self) -> bool:
        """Whether the final pass's long page runs leave as page references (one channel, page runs,
        a plain unix socket): their writes cost the source little, the destination does the copy."""
        return self.multifd is None and self._page_runs() and self.stream.can_reference()

    def _decide(self, pending: int, exact: bool) -> Decision:
        references = self._final_by_reference()  # known once the destination accepted page runs
        if references != self.policy.references:
            self.policy.on_references(references)
        self.policy.on_backlog(self._backlog())  # what the destination has still to read
        decision = self.policy.decide(time.monotonic(), pending, exact)
        for action in decision.actions:
            self._execute(action)
        self.threshold = float(self.policy.threshold())
        if exact:  # with all the sync taught it (the layout of what is left, the backlog): at a
            # switch-over the figure the log prints and query-migrate keeps is the decision's own
            self._publish_expected_downtime(self.stats.remaining)
        return decision

    def _execute(self, action: Action) -> None:
        """One act of the built-in policy: an event, then the act itself (migration thread)."""
        ms = self.ms
        log.info("migration policy: %s %d (%s)", action.action, action.value, action.reason)
        ms.policy_actions = list(self.policy.actions)
        if ms.config.cap("events"):
            ms.host.events.emit("X_MIGD_POLICY_ACTION", {"action": action.action, "value": action.value,
                                                            "reason": action.reason})
        if action.action == "throttle" and self.throttle is None:  # auto-converge keeps QEMU's rule
            self._computed_throttle = action.value
            self.machine.vcpus.throttle(action.value)
            ms.throttle_percentage = action.value
        elif action.action == "abort":
            raise MigrationFailed(action.reason)

    def _unthrottle(self) -> None:
        if self._computed_throttle:
            self.machine.vcpus.throttle(0)
            self._computed_throttle = 0
            self.ms.throttle_percentage = 0

    # -- the destination's round trip ---------------------------------------------------------------

    def _send_ping(self, behind: int | None = None, since: float = 0.0, drained: bool = False) -> None:
        """About once a second, a PING whose PONG is timed; nothing ever waits for it. Called before
        a burst of pages (``behind`` None: the plain round trip, once a second) and after a burst of
        mostly data pages (``behind`` = its bytes, ``since`` its start): when the rate limit let the destination
        catch up before the burst, a probe PING once a second goes out after it, timed from the
        burst's start, so that its answer tells how long those bytes took from here until loaded
        there (the final pass's pace end to end, which short capped bursts into a socket buffer
        never show). One PING is out at a time."""
        if self.rp is None:
            return
        now = time.monotonic()
        if self._ping_sent is not None:
            if now - self._ping_sent[1] < PONG_TIMEOUT:
                return
            log.info("migration: PING %d unanswered after %.0f s", self._ping_sent[0], PONG_TIMEOUT)
            self.policy.peer_silent()
        if behind is None:
            if not drained and self._last_ping and now - self._last_ping < PING_INTERVAL:
                return
            self._last_ping = now
        else:
            if not self._slept or self.multifd is not None or not self._last_ping or (
                    self._last_probe and now - self._last_probe < PING_INTERVAL):
                return
            self._last_probe = now
        self._ping += 1
        self.stream.put(command(Cmd.PING, self._ping.to_bytes(4, "big")))
        self.stream.flush()
        sent_at = time.monotonic()
        self._ping_sent = (self._ping, since if behind else sent_at, behind or 0,
                           queued_bytes(self.channel), sent_at - since if behind else 0.0, drained)

    def _pages(self) -> int:
        """Pages sent so far, zero pages included."""
        return self.stats.normal + self.stats.duplicate

    def _wait_pong(self, timeout: float) -> None:
        """Nothing left to decide before the first PONG: wait for it a little (bounded), not spin."""
        rp, sent = self.rp, self._ping_sent
        if rp is not None and sent is not None:
            value = sent[0]
            if self._accepted() & FEATURE_LOAD_PACE:  # the PONG, and the report that follows it
                rp.wait_for(lambda: value in rp.pongs and any(p.ping == value for p in rp.paces), timeout)
            else:
                rp.wait_for_pong(value, timeout)
            self._take_paces()
            self._time_pong()

    def _time_pong(self) -> None:
        """The PING's round trip, once its PONG came (arrival time stamped by the reader)."""
        rp, sent = self.rp, self._ping_sent
        if rp is None or sent is None:
            return
        arrived = rp.pong_at.get(sent[0])
        if arrived is None:
            age = time.monotonic() - sent[1]
            if not sent[2] or age >= PING_INTERVAL:  # a probe's wait is the load, until it is long
                self.policy.on_rtt(age, lower_bound=True)
            return
        held = 0.0
        if self._accepted() & FEATURE_LOAD_PACE and not sent[2]:
            # the destination says how long the PING waited there behind what came before it (64 KiB of
            # zero-page records cost it ~15 ms): that is its load, which the backlog counts, not a trip
            got = self._held.pop(sent[0], None)
            if got is None and time.monotonic() - arrived < HELD_WAIT:
                return  # its report follows the PONG: take the sample next turn
            held = got or 0.0
        self._ping_sent = None
        # the switch-over waits for LOADED, and with the commit protocol for SHUT after COMMIT too
        self.policy.round_trips = 2 if self._accepted() & FEATURE_COMMIT else 1
        self.policy.on_rtt(max(0.0, arrived - sent[1] - held), behind_bytes=sent[2], queued_bytes=sent[3],
                           burst_s=sent[4], drained=sent[5])

    def _take_paces(self) -> None:
        """The destination's LOAD_PACE reports that came since the last turn, to the policy
        (migration thread)."""
        rp = self.rp
        if rp is None or rp.pace_count == self._paces_seen:
            return
        paces, self._paces_seen = rp.paces_after(self._paces_seen)
        for pace in paces:
            if pace.ping:
                self._held[pace.ping] = pace.held_s
                for old in list(self._held)[:-4]:
                    del self._held[old]
            self.policy.on_load_pace(pace.arrived, pace.bytes_read, pace.pages, pace.busy_s, pace.wait_s,
                                     pace.cpu_s, self._runs_at(pace.bytes_read))

    def _runs_at(self, offset: int) -> int | None:
        """(migration thread) Runs of data pages sent up to stream byte ``offset`` (what a LOAD_PACE
        report's bytes read covered), interpolated between the marks left after each batch of
        pages; None without marks (multifd: the pages go on other channels)."""
        marks = self._run_marks
        if not marks or self.multifd is not None:
            return None
        pos = bisect.bisect_right(marks, (offset, math.inf))
        if pos == 0:
            return marks[0][1] if offset >= marks[0][0] else None
        if pos == len(marks):
            return marks[-1][1]
        (b0, r0), (b1, r1) = marks[pos - 1], marks[pos]
        return r0 + round((r1 - r0) * (offset - b0) / (b1 - b0)) if b1 > b0 else r1

    # -- counters (QEMU's migration_update_counters / migration_rate_limit) -----------------------

    def _new_window(self, now: float) -> None:
        self._iter_start = now
        self._iter_bytes = self.stream.transferred
        self._iter_busy = self.stream.write_busy
        self._iter_sleep = 0.0
        self._iter_save = 0.0  # s of save_iterate's page work that a final pass repeats
        self._iter_runs = self.savevm.ram.runs_sent if self.savevm is not None else 0
        self._iter_pages = self.stats.normal + self.stats.duplicate
        self._iter_cpu = time.thread_time()
        self.stream.reset_window()

    def _rate_limit(self) -> None:
        now = time.monotonic()
        if now - self._iter_start >= WINDOW:
            self._update_counters(now)
        if self.stream.rate_limit_exceeded() and self.stream.error is None:
            delay = self._iter_start + WINDOW - time.monotonic()
            if delay > 0:
                t0 = time.monotonic()
                woken = self.ms.wake_event.wait(delay)
                slept = time.monotonic() - t0
                self._iter_sleep += slept
                self._slept = True
                if not woken:  # how late a sleeping thread wakes: the vCPU stop's prior
                    self.policy.on_phase("wake", max(0.0, slept - delay) * 1000)

    def _update_counters(self, now: float) -> None:
        stats = self.stats
        transferred = self.stream.transferred - self._iter_bytes
        busy = self.stream.write_busy - self._iter_busy
        spent = now - self._iter_start
        spent_ms = spent * 1000
        pages = stats.normal + stats.duplicate
        self.bandwidth = transferred / spent_ms
        self.policy.on_window(now, transferred, busy, max(busy, spent - self._iter_sleep), spent,
                              (pages - self._iter_pages) * stats.page_size, time.thread_time() - self._iter_cpu,
                              max(busy, self._iter_save), self._window_runs())
        if self.savevm is not None:
            self.policy.on_dirty_log(now, self.savevm.unsynced_bytes())
        self.threshold = float(self.policy.threshold())
        stats.mbps = transferred * 8 / (spent_ms / 1000) / 1e6
        stats.pages_per_second = int((pages - self._iter_pages) / (spent_ms / 1000))
        if transferred > 10000:
            self._publish_expected_downtime(stats.remaining)
        self._publish_forecast(now)
        self._new_window(now)

    def _window_runs(self) -> int | None:
        """Runs of data pages this thread sent in the window; None with multifd (the channels' threads
        do the page work, in their own batches)."""
        if self.savevm is None or self.multifd is not None:
            return None
        return self.savevm.ram.runs_sent - self._iter_runs

    def _publish_expected_downtime(self, pending: int) -> None:
        """The policy's downtime of the switch-over it plans; before the first window closed, the
        average rate since the migration began stands in for the final-pass rate."""
        elapsed = time.monotonic() - self.ms.start_time
        fallback = self.stream.transferred / elapsed if elapsed > 0 else 0.0
        self.ms.expected_downtime = self.policy.expected_downtime_ms(pending, fallback)

    def _publish_forecast(self, now: float) -> None:
        """``x-migd-convergence`` for query-migrate, and X_MIGD_CONVERGENCE when the state changed."""
        ms = self.ms
        ms.convergence = self.policy.forecast(now, self.stats.remaining)
        after = self.policy.state
        if after is not self._published_state:
            self._published_state = after
            log.info("migration convergence: %s %s", after, ms.convergence)
            if ms.config.cap("events"):
                ms.host.events.emit("X_MIGD_CONVERGENCE", dict(ms.convergence))

    # -- heartbeats and the silence watch (docs/SWITCHOVER.md §2) -----------------------------------

    def _peer_timeout(self) -> int:
        return int(self.ms.config.param("x-migd-peer-timeout"))

    def _announce(self) -> tuple[int, int]:
        """(features, peer timeout ms) for the configuration subsection. Checksums go everywhere (a
        ``file:`` save is checked when restored) unless ``x-migd-checksums`` is false (QEMU's stream has
        none; they cost ~0.1 CPU s/GiB on each side over TCP); commit and heartbeats need a return path."""
        checksums = FEATURE_CHECKSUM if self.ms.config.param("x-migd-checksums") else 0
        if not self.use_return_path:
            return checksums, 0
        return FEATURES_SUPPORTED & ~FEATURE_CHECKSUM | checksums, self._peer_timeout() * 1000

    def _page_runs(self) -> bool:
        """(migration thread) Whether the destination accepted page runs (FORMAT.md §3.3): from then
        on pages go as RAM_X_MIGD_RUN records, which it reads straight into guest RAM."""
        return bool(self._accepted() & FEATURE_PAGE_RUNS)

    def _accepted(self) -> int:
        rp = self.rp
        return rp.features or 0 if rp is not None else 0

    def _start_watchdog(self) -> None:
        """(migration thread) Heartbeats into the stream while it is idle; the destination's silence."""
        assert self.rp is not None
        rp = self.rp
        timeout = self._peer_timeout()
        self._beat = IdleStream(self.stream, command(CMD_X_MIGD_HEARTBEAT))
        tcp_timeout_set = False

        def agreed() -> bool:
            return rp.features is not None and bool(rp.features & FEATURE_HEARTBEAT)

        def interval() -> float | None:
            nonlocal tcp_timeout_set
            if not agreed():
                return None
            if not tcp_timeout_set:  # a migd destination: TCP may give up on it as fast as we do
                tcp_timeout_set = True
                set_peer_timeout(self.channel, timeout)
            return beat_interval(rp.peer_timeout_ms)

        def silent_for() -> float | None:
            if not agreed():
                return None
            if rp.stopped:  # the return path ended without SHUT: gone, whatever state we wait in
                return float("inf") if rp.shut is None and rp.error is not None else None
            return rp.silent_for()

        assert self._beat is not None
        self._watchdog = Watchdog("mig/src/beat", timeout, self._beat.beat, interval, silent_for,
                                  self._on_silence)
        self._watchdog.start()

    def _on_silence(self, seconds: float) -> None:
        """(watchdog thread) The destination said nothing for too long: fail (or, committed, stay paused)."""
        if seconds == float("inf"):
            self._silence = self.rp.error if self.rp is not None and self.rp.error else "Return path closed"
        else:
            self._silence = (f"The destination has been silent for {seconds:.1f} s "
                             f"(x-migd-peer-timeout is {self._peer_timeout()} s)")
        log.warning("migration: %s", self._silence)
        self.stream.shutdown()  # wakes a blocked write and the return-path reader
        self.ms.wake_event.set()
        self.ms.continue_event.set()
        if self.rp is not None:
            self.rp.wake()

    def _idle(self) -> Any:
        """A block in which the stream is left alone, so heartbeats may go out."""
        return self._beat.idle() if self._beat is not None else nullcontext()

    # -- completion (QEMU's migration_completion_precopy, reordered for downtime) -------------------

    def _complete(self) -> None:
        ms, machine, stream = self.ms, self.machine, self.stream
        decided = time.monotonic()
        self._completing = True
        self._switch_pending = self.stats.remaining
        log.info("migration switch-over: pending=%d threshold=%d expected_downtime=%d",
                 self.stats.remaining, int(self.threshold), ms.expected_downtime)
        with self._idle(), BQL:  # flush while the guest still runs: the slow part stays out of downtime
            machine.flush_drives()
        with BQL:
            self._expect(M.ACTIVE)
            clock = PhaseClock()  # downtime starts
            self._stop_gap_ms = (time.monotonic() - decided) * 1000  # the guest still dirtied pages
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
            self._expect(M.PRE_SWITCHOVER)  # a silent destination noticed before the clear
            with self._idle():
                ms.continue_event.wait()  # migrate-continue, migrate_cancel or a silent destination
            clock.mark("pre-switchover")
            self._expect(M.PRE_SWITCHOVER)
            if not ms.set_state(M.PRE_SWITCHOVER, M.DEVICE):
                raise Cancelled()
        elif not ms.set_state(M.ACTIVE, M.DEVICE):
            raise Cancelled()
        with BQL:
            machine.inactivate_drives()
            self._drives_inactive = True
        self._set_unlimited()
        clock.mark("inactivate-drives")
        self._final_pass(clock)
        if self.rp is not None:
            self._handshake(clock)
        with BQL:
            end = time.monotonic()
            if ms.status is not M.DEVICE:
                raise Cancelled()
            ms.downtime = int(round(clock.total_ms()))
            ms.downtime_phases = {k: round(v, 3) for k, v in clock.phases.items()}
            ms.total_time = int((end - ms.start_time) * 1000)
            moving_ms = ms.total_time - ms.setup_time
            if moving_ms > 0:
                self.stats.mbps = stream.transferred * 8 / moving_ms / 1000
            if not ms.set_state(M.DEVICE, M.COMPLETED):
                raise Cancelled()
            self.runstate.set(RunState.POSTMIGRATE)
        log.info("migration completed: downtime=%d ms phases=%s total=%d ms", ms.downtime,
                 ms.downtime_phases, ms.total_time)

    def _final_pass(self, clock: PhaseClock) -> None:
        """Rest of RAM (no rate limit), device state, EOF and description, flushed.

        With a return path the destination's features must be known before EOF: a destination without
        the commit protocol may run once it has the EOF, so for it the EOF is the point of no return.
        """
        savevm, stream = self.savevm, self.stream
        assert savevm is not None  # made in setup, before any switch-over
        cpu, busy, sent = time.thread_time(), stream.write_busy, stream.transferred
        savevm.save_complete_ram(stream)
        stream.flush()
        clock.mark("ram-final")
        # for the trace: the thread's own CPU, the time blocked in writes (a full socket: the
        # destination's side), and the bytes; the rest of the wall time the thread was descheduled
        self._final_cpu_ms = (time.thread_time() - cpu) * 1000
        self._final_write_ms = (stream.write_busy - busy) * 1000
        self._final_bytes = stream.transferred - sent
        with BQL:  # devices are read while nothing else may touch them
            savevm.save_complete_devices(stream)
        clock.mark("device-state")
        if self.rp is not None:
            stream.flush()
            # FEATURES comes before any PONG: once anything came, the features are known
            self._wait_rp(lambda rp: rp.answered)
            self._expect(M.DEVICE)
            if not self.rp.answered:
                raise MigrationFailed(self.rp.error or "The destination did not answer before the end of "
                                      "the stream")
            if not self._accepted() & FEATURE_COMMIT and not self.ms.commit():
                raise Cancelled()
        savevm.save_eof(stream)
        stream.flush()
        clock.mark("eof-flush")

    def _wait_rp(self, done: Any) -> None:
        """(migration thread) Wait, stream idle, until ``done(rp)``, the reader stopped, the state left
        ``device``, the destination went silent, or ACK_TIMEOUT passed."""
        rp = self.rp
        assert rp is not None
        deadline = time.monotonic() + ACK_TIMEOUT
        with self._idle():
            while not done(rp) and not rp.stopped and self.ms.status is M.DEVICE and self._silence is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                rp.wait_for(lambda: bool(done(rp)), min(left, 0.5))

    def _handshake(self, clock: PhaseClock) -> None:
        """After EOF: LOADED, then the point of no return, COMMIT, SHUT(0) (or a legacy SHUT alone)."""
        ms, rp = self.ms, self.rp
        assert rp is not None
        self._wait_rp(lambda r: r.loaded or r.shut is not None)
        clock.mark("wait-ack")
        if rp.shut is not None and rp.shut != 0:
            self._peer_refused = True  # the destination will not run the guest: resuming is safe
            raise MigrationFailed(sibling_error(rp.shut))
        if ms.committed:  # a destination without the commit protocol: the EOF was the point of no return
            if rp.shut == 0:
                return
            raise MigrationFailed(self._committed_desc(self._silence or rp.error or
                                                       "Timed out waiting for the destination to "
                                                       "acknowledge the load"))
        self._expect(M.DEVICE)
        if not rp.loaded:
            raise MigrationFailed(rp.error or "Timed out waiting for the destination to load the state")
        if rp.stopped:  # LOADED, then the return path closed: the destination cannot confirm a COMMIT
            raise MigrationFailed(rp.error or "Return path closed after the destination loaded the state")
        if not ms.commit():  # a cancel won the race: COMMIT is never sent, the destination never runs
            raise Cancelled()
        sent = self.stream.transferred
        try:
            self.stream.put(command(CMD_X_MIGD_COMMIT))
            self.stream.flush()
        except StreamError as exc:
            if self.stream.transferred == sent:  # not one byte of it left: the destination cannot run
                self._peer_refused = True
                raise MigrationFailed(f"{self._silence or exc}; the COMMIT could not be sent") from exc
            raise MigrationFailed(self._committed_desc(self._silence or str(exc))) from exc
        self._wait_rp(lambda r: r.shut is not None)
        clock.mark("commit")
        if rp.shut == 0:
            return
        if rp.shut is not None:
            self._peer_refused = True
            raise MigrationFailed(sibling_error(rp.shut))
        raise MigrationFailed(self._committed_desc(self._silence or rp.error or
                                                   "Timed out waiting for the destination to start"))

    @staticmethod
    def _committed_desc(reason: str) -> str:
        return (f"{reason}; the migration was committed, so the guest stays paused here: the "
                "destination may be running it")

    # -- the end, whatever it was (QEMU's migration_iteration_finish) -----------------------------

    def _finish(self) -> None:
        ms, machine = self.ms, self.machine
        policytrace.save(self.policy, ms.config.params, {
            "status": str(ms.status), "downtime": ms.downtime, "expected_downtime": ms.expected_downtime,
            "switch_pending": self._switch_pending, "phases": ms.downtime_phases,
            "ram_final_cpu_ms": self._final_cpu_ms, "ram_final_write_ms": self._final_write_ms,
            "ram_final_bytes": self._final_bytes, "stop_gap_ms": self._stop_gap_ms})
        if self.throttle is not None:
            self.throttle.stop()
        ms.throttle_percentage = 0
        if self._watchdog is not None:
            self._watchdog.stop()
        if ms.status is not M.COMPLETED and ms.committed and not self._peer_refused:
            # past the point of no return: the destination may own the guest, never resume it here
            with BQL:
                if self.runstate.state is RunState.FINISH_MIGRATE:
                    self.runstate.set(RunState.POSTMIGRATE)
            log.error("migration: committed but not confirmed; the guest stays paused: %s", ms.error_desc)
        elif ms.status is not M.COMPLETED:
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
