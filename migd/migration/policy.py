"""The switch-over policy: when to stop the guest, what that will cost, and what to do when it won't.

A pure object (docs/SWITCHOVER.md §1): no threads, no I/O, no clock of its own — every call carries
``now`` — so it is tested by replaying traces. The migration thread feeds it what it measured and
executes what it answers.

The model:
- **the link**: ``capacity`` = bytes / seconds spent *inside* channel writes, measured even while the
  rate limit holds the stream back, kept apart from the capped ``throughput`` (bytes / window);
- **the final pass** runs uncapped: it costs the write time at link capacity plus the thread's own
  work per byte (finding, reading and framing pages: the window's page work outside writes), so
  ``final_rate = 1 / ((1 - reference_share)/capacity + cpu_per_byte)``, where the bytes that leave
  a unix socket as page references cost no copying write — or ``avail-switchover-bandwidth`` when set
  (QEMU's meaning: the bandwidth the switch-over may count on); the final pass re-sends pages, so
  its costs are learnt past the first pass (first sends cost more, on both ends);
- **the backlog**: what the socket holds that the destination has not read (``on_backlog``); it is
  loaded before the final pass, at the destination's reported pace (below; without reports, at the
  link capacity and only without a rate limit), so a switch-over first ``DRAIN``s it, the guest
  running, and counts it in only when it does not drain within DRAIN_BUDGET_S;
- **the destination** (feature LOAD_PACE, ``on_load_pace``): its own pace loading data pages, as it
  went and on a CPU of its own; the final pass goes no faster than the slower end, and the decision
  counts on no more than the destination's slower spans;
- **fixed costs** are measured in this migration: the vCPU stop (real, else twice the thread's
  measured wake-up latency), the drive flush, the final bitmap sync, the device-state save (a dry run
  at setup), the destination's round trip (PONGs), and the rest of the switch-over's framing;
- **the guest**: the dirty rate (bytes newly dirtied per second between bitmap syncs) and the
  writable working set (the largest dirty set a sync found after the first pass); until two syncs
  past the first pass measured them, a fit of the dirty log's growth since the last sync (peeked at
  every window, no take: ``on_dirty_log``) to ``W (1 - exp(-r t / W))``, uniform writes at rate ``r``
  over a set of ``W`` bytes — the only view of the guest during a long first pass.

``expected_downtime_ms(remaining) = fixed + backlog / drain rate + planned final pass / final_rate``: a forecast
of the switch-over this policy will make, not the cost of one made now — the decision replayed on the
model round by round (during the first pass, from what the dirty log will hold when it ends; a plan
that never fits ends at the threshold, above which no switch-over is made). The
threshold is the remaining that fits in the downtime limit. Below it the switch-over goes ahead
unless one more live round is predicted to leave at most ``HALVING`` of what is left and the RAM part
still matters next to the fixed costs (a round costs the guest nothing; the limit is a ceiling, not a
target); that verdict has hysteresis, so that a guest whose rounds shrink by about ``HALVING`` gets
one plan, and the forecast made a second in holds at the switch-over.

The built-in convergence policy (off by default: every ``x-migd-…`` parameter at 0) comes back as
``Action``s in the ``Decision``: progress timeout (abort, or escalate), downtime steps (Nova's
schedule), a computed throttle (what the dirty rate needs against the link), and a completion timeout
per GiB of guest RAM.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

from migd.units import PAGE_SIZE

GIB = 1 << 30
EWMA = 0.3  # weight of a new window in the bandwidth averages
MIN_WINDOW_BYTES = 64 << 10  # a window with fewer bytes says nothing about bandwidth
MIN_BUSY_S = 0.0005  # a window with less time in writes says nothing about the link
SYNC_INTERVAL = 1.0  # s: past the first pass, a bitmap sync at least this often (dirty-rate samples)
HALVING = 0.6  # another live round must leave at most this fraction of what is left
HALVING_BAND = 0.15  # ... a verdict changes only once the ratio is this much (relative) past HALVING
RAM_MATTERS = 0.25  # ... and the RAM part of the downtime must be at least this much of the fixed part
RATE_SAMPLES = 10  # windows whose spread the threshold allows for
MIXED_SHARE = 0.1  # a window whose wire bytes are at least this share of its RAM bytes has data pages
PLAN_ROUNDS = 30  # rounds the expected downtime looks ahead at most
RUN_FIT_MIN_T = 2.0  # a fitted cost of a run counts when it is this many standard errors above 0
RUN_FIT_MIN_SPREAD = 3.0  # ... and its samples' runs per byte span at least this factor
REFERENCE_RUN = 16  # pages: a run this long leaves a unix socket as page references (stream.SPLICE_MIN)
STALL_S = 5.0  # s without a new low of remaining before a forecast says stalled
PROGRESS_STEP = 0.05  # a new low of remaining must be this much below the last one
SAMPLE_SPACING = 0.9  # s between the remaining samples the trend is judged on
# a computed throttle aims at a dirty rate of this share of the throughput: well below HALVING (less
# its band), so that the rounds of a throttled guest clearly drain, not by the measurement's noise
THROTTLE_TARGET = 0.4
# a backlog the destination would load for longer than this inside the downtime is drained first,
# the guest running (16M unlimited: 4-8 MB queued at the switch-over, 23-47 ms of `wait-ack`)
DRAIN_MS = 2.0
DRAIN_BUDGET_S = 1.0  # s of draining before one switch-over at most: then it counts the backlog in
PROBE_WAIT_S = 3.0  # s the first switch-over under a rate limit waits at most for a probe (see decide)
RESEND_WAIT_S = 1.0  # s after the first pass the first switch-over waits at most for a re-send window
FLOOR_AFTER_S = 0.5  # s: a PING unanswered for longer raises the round trip (before one PONG: any age)
PEEKS = 1024  # dirty-log peeks kept since the last sync (one a window)
# a probe's PONG later than its burst took by less than this share of it: the destination kept up
PROBE_LAG = 0.5
PEEK_MIN_S = 0.2  # s of dirty log a fit needs at least
PACE_SPANS = 32  # LOAD_PACE spans the cost fit looks at
PACE_MIN_BUSY_S = 0.001  # s: a span between LOAD_PACE reports with less busy time says nothing
# the convergence state's hysteresis: judgements in a row needed to leave a state, and how long a
# state holds at least once announced (a throttled guest hovers about the threshold)
LEAVE_AFTER = 2
HOLD_S = 3.0
# priors, used only until this migration measured the cost
PRIOR_STOP_MS = 1.0
PRIOR_OTHER_MS = 1.0
# s of page work a run costs beyond its bytes, until windows of different layouts measured it (fitted:
# 3.2 and 4.2 us, 200M on a 64 MiB hot set over 128 MiB/s; bench_final_pass: 4.8 us a page alone, ~1.5
# in a long run): capped windows of one round are often all alike (the anchor case: 9-30 pages a run in
# every window, its final pass 1.9, 0.73 ns/B measured, 1.2 real)
PRIOR_RUN_S = 3e-6
# the same for the destination, until its LOAD_PACE spans of different layouts allowed a fit. It prices
# the runs a final pass has more than the span its pace came from, so it is the marginal cost of a run
# between layouts of 2.5-38 pages a run (bench_pass_layout, 40 MB): 13-15 us on the sixth session's
# machine, 6-7 us on the eighth's (the cost from a single run up is higher: 11-16 us)
DEST_PRIOR_RUN_S = 10e-6
# How much slower than its estimate the decision lets a final pass run, at least: the windows' spread
# does not show that a long final pass competes for the CPU with the destination's load, which the
# short capped bursts do not (measured: 254 MB at 738 MB/s against 944 estimated, 2 shared cores).
MIN_SPREAD = 0.25  # framing of the switch-over outside RAM and devices (EOF, vmdesc, state changes)
PHASES = ("stop-vcpus", "drive-flush", "sync", "device-state", "other")


class Step(StrEnum):
    ITERATE = "iterate"  # send another batch of pages
    SYNC = "sync"  # ask for an exact pending (bitmap sync), then decide again
    SWITCHOVER = "switchover"
    DRAIN = "drain"  # wait, sending nothing, until the destination loaded what the socket holds


class Convergence(StrEnum):
    CONVERGING = "converging"
    STALLED = "stalled"
    DIVERGING = "diverging"


@dataclass(frozen=True)
class Action:
    """One act of the built-in policy; the thread executes it and emits one event."""

    action: str  # "throttle" | "downtime-limit" | "abort"
    value: int  # throttle %, downtime limit in ms, 0 for abort
    reason: str

    def as_dict(self, time_ms: int) -> dict[str, Any]:
        return {"time-ms": time_ms, "action": self.action, "value": self.value, "reason": self.reason}


@dataclass(frozen=True)
class Decision:
    step: Step
    actions: tuple[Action, ...] = ()


@dataclass
class _Ewma:
    value: float = 0.0
    samples: int = 0

    def add(self, x: float) -> None:
        self.value = x if not self.samples else self.value + EWMA * (x - self.value)
        self.samples += 1


@dataclass
class _Guest:
    """What the syncs told about the guest's writes."""

    last_sync: float | None = None
    syncs: int = 0
    dirty_rate: _Ewma = field(default_factory=_Ewma)  # bytes/s dirtied (distinct pages between syncs)
    raw_rate: _Ewma = field(default_factory=_Ewma)  # the same, as the guest would dirty unthrottled
    working_set: int = 0  # bytes: the largest dirty set found after the first pass
    low: int | None = None  # the smallest remaining seen (a new low must beat it by PROGRESS_STEP)
    low_time: float = 0.0
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=3))  # (t, remaining)
    peeks: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=PEEKS))  # (s since sync, bytes)
    fit: tuple[float, float] | None = None  # (rate bytes/s, working set bytes) from the dirty log's growth
    fit_fresh: bool = False  # the fit is this interval's (a short interval between syncs makes none)
    pace: _Ewma = field(default_factory=_Ewma)  # bytes/s the guest writes: per interval, its fit or distinct pages
    hot_set: int = 0  # bytes: the set the last fit found (all RAM while its growth is linear; 0 = none)


def fit_dirty_log(peeks: deque[tuple[float, int]] | list[tuple[float, int]],
                  ceiling: float) -> tuple[float, float] | None:
    """(rate bytes/s, working set bytes) of uniform writes that explain the dirty log's growth since
    the last sync, ``D(t) = W (1 - exp(-k t))`` with ``k = rate / W``, fitted on the last peek and the
    one nearest half its age. Growth still linear gives ``(D / t, ceiling)``; the set never exceeds
    ``ceiling`` (the guest's RAM). None until the log covers PEEK_MIN_S."""
    if not peeks:
        return None
    t2, d2 = peeks[-1]
    if t2 < PEEK_MIN_S:
        return None
    if d2 <= 0:
        return 0.0, 0.0  # nothing written: an idle guest
    t1, d1 = min(peeks, key=lambda p: abs(p[0] - t2 / 2))
    if not 0 < t1 < t2 or d1 <= 0:
        return d2 / t2, ceiling
    m, q = t2 / t1, d2 / d1
    if q >= 0.97 * m:  # still growing linearly: the set is far larger than what was written
        return d2 / t2, ceiling
    if q <= 1.02:  # already saturated at t1: the set is what was written, the rate at least d1 / t1
        return max(d1 / t1, d2 / t2), min(float(d2), ceiling)
    # (1 - e^-k t2) / (1 - e^-k t1) falls from m (k -> 0) to 1 (k -> inf): bisection on log k
    lo, hi = 1e-6, 1e4
    for _ in range(60):
        k = math.sqrt(lo * hi)
        if math.expm1(-k * t2) / math.expm1(-k * t1) > q:
            lo = k
        else:
            hi = k
    k = math.sqrt(lo * hi)
    wss = min(d2 / -math.expm1(-k * t2), ceiling)
    return k * wss, wss


def dirtied_by(fit: tuple[float, float], seconds: float) -> float:
    """Bytes a fitted guest has dirtied ``seconds`` after a sync (distinct pages)."""
    rate, wss = fit
    if wss <= 0 or rate <= 0:
        return 0.0
    return wss * -math.expm1(-rate * seconds / wss)


def run_share(dirty: float, length: int) -> float:
    """The share of dirty pages that lie in runs of at least ``length`` pages when each page of a set
    is dirty with probability ``dirty``, independently (a uniform writer): the run through a dirty
    page reaches ``a`` pages back and ``b`` on with P(a) = dirty^a (1 - dirty), so it is shorter than
    ``length`` with probability sum over k < length - 1 of (k + 1) dirty^k (1 - dirty)^2."""
    if dirty >= 1.0:
        return 1.0
    if dirty <= 0.0:
        return 0.0
    shorter = sum((k + 1) * dirty**k for k in range(length - 1)) * (1 - dirty) ** 2
    return max(0.0, 1.0 - shorter)


_STALE = object()  # a cached fit that samples added since have made stale


def _lower_median(values: Iterable[float]) -> float:
    """The lower median (of two, the smaller) of at least one value."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def _least_squares(samples: Iterable[tuple[float, float, float]], min_det: float) -> tuple[float, float] | None:
    """The least-squares fit of (x, y, z) samples to ``z = a x + b y``: (a, b); None when the
    normalized determinant is at most ``min_det`` (x and y too alike to be told apart)."""
    sxx = syy = sxy = sxz = syz = 0.0
    for x, y, z in samples:
        sxx += float(x) * x
        syy += float(y) * y
        sxy += float(x) * y
        sxz += x * z
        syz += y * z
    det = sxx * syy - sxy * sxy
    if det <= min_det * sxx * syy:
        return None
    return (syy * sxz - sxy * syz) / det, (sxx * syz - sxy * sxz) / det


def _fit_run_cost(samples: Collection[tuple[int, int, float]]) -> float | None:
    """The fit of (bytes, runs, seconds) samples to ``a bytes + b runs``: ``b``, the seconds a run
    costs beyond its bytes (None with fewer than three samples, samples too alike to tell runs from
    bytes, a fit that makes no sense, or one the samples cannot carry: their runs per byte within a
    factor RUN_FIT_MIN_SPREAD of each other, or a ``b`` within RUN_FIT_MIN_T standard errors of
    nothing. Capped windows of 3.3 MB and 4-9 runs each (a spread of 2.0-2.2), their times 1.0-3.0
    ms, fitted 46-193 us a run, once at t = 2.4, where a run costs 7-18 us (bench_pass_layout); the
    fits of scattered rounds had spreads of 4.4-59 and 1-8 us a run)."""
    fit = _least_squares(samples, 0.05) if len(samples) >= 3 else None
    if fit is None:
        return None
    per_byte, per_run = fit
    if per_run <= 0 or per_byte < 0:
        return None
    rpb = [r / b for b, r, _ in samples if b > 0]
    if not rpb or max(rpb) < RUN_FIT_MIN_SPREAD * min(rpb):
        return None
    sxx = sum(float(b) * b for b, _, _ in samples)
    syy = sum(float(r) * r for _, r, _ in samples)
    sxy = sum(float(b) * r for b, r, _ in samples)
    residuals = sum((s - per_byte * b - per_run * r) ** 2 for b, r, s in samples)
    variance = residuals / (len(samples) - 2) * sxx / (sxx * syy - sxy * sxy)
    return per_run if per_run >= RUN_FIT_MIN_T * math.sqrt(variance) else None


def nova_schedule(limit_ms: int, max_ms: int, steps: int, delay_s: float) -> list[tuple[float, int]]:
    """Nova's downtime steps: ``steps + 1`` limits growing geometrically from ``max/(steps+1)`` to
    ``max``, ``delay_s`` apart (Nova's delay is 75 s per GiB of guest RAM). Never below ``limit_ms``."""
    offset = max_ms / (steps + 1)
    base = (max_ms - offset) ** (1 / steps) if max_ms > offset else 1.0
    return [(delay_s * i, max(limit_ms, int(offset + base ** i))) for i in range(steps + 1)]


class SwitchoverPolicy:
    """Decisions and estimates for one outgoing migration. Called from the migration thread only;
    ``forecast`` and the published numbers may be read from any thread (plain attributes)."""

    def __init__(self, params: Callable[[], Mapping[str, Any]], ram_total: int, start: float,
                 peer_answers: bool = False) -> None:
        self._params = params
        # with a return path the first switch-over waits until one PING was answered (or given up
        # on): until then the round trip, and the backlog the destination still has to load, are
        # unknown. Once is enough: later PINGs only refresh the estimate.
        self.peer_answers = peer_answers
        self.waiting_for_peer = False
        self.ram_total = ram_total
        self.start = start
        self.capacity = _Ewma()  # bytes/s inside channel writes: the link
        self._link_bytes, self._link_busy = 0, 0.0  # windows not yet counted in capacity
        self.throughput = _Ewma()  # RAM bytes/s over whole windows: what the rate limit lets through
        self.cpu_per_byte = _Ewma()  # s of the thread's own work per byte re-sent, outside writes
        self._cpu_first: float | None = None  # the same, the cheapest window of first sends
        self.data_throughput = _Ewma()  # bytes/s over windows of data pages: a live round's pace
        self._cpu_mixed = _Ewma()  # per guest RAM byte, over windows with some data pages
        self._cpu_any = _Ewma()  # the same over zero-page windows, until a data window was seen
        self._rtt: deque[float] = deque(maxlen=5)  # s, the last round trips
        self._rtt_floor = 0.0  # s, the age of the PING still unanswered
        self._rtt_drained: float | None = None  # s, the last round trip of a PING sent as a DRAIN ended
        self.round_trips = 1  # the switch-over waits for LOADED (and for SHUT after COMMIT: 2)
        # the thread times a quiet round trip (a PING as a DRAIN ends) before the first switch-over
        # that has none; a trace recorded before it did replays without (policytrace)
        self.times_quiet_rtt = True
        self._quiet_rtt_asked = False
        self._load_rates: deque[float] = deque(maxlen=5)  # probes of re-sends (past the first pass)
        self._load_first = 0.0  # bytes/s, the fastest probe of first sends
        self._probed = False  # a probe past the first pass was answered (one that bounds the rate or not)
        self._cpu_recent: deque[float] = deque(maxlen=RATE_SAMPLES)  # the last re-send windows' costs
        self.backlog = 0  # bytes the socket held for the destination at the last decision
        self.reference_share = 0.0  # of what is left, the share a final pass sends as page references
        self._final_rpb: float | None = None  # runs of dirty pages per byte left, at the last layout
        self.references = False  # whether the final pass's long runs would leave as page references
        self._past_first_pass = False  # planning, during the first pass, what follows it (see below)
        # (bytes, runs, s of page work) of data windows: re-sends, and the first pass's; a page costs
        # more alone than in a run of many, and the fit of the two costs says how much
        self._run_samples: deque[tuple[int, int, float]] = deque(maxlen=RATE_SAMPLES)
        self._run_first: deque[tuple[int, int, float]] = deque(maxlen=RATE_SAMPLES)
        self._first_rpb = 0.0  # runs per byte of the cheapest first-pass window (_cpu_first's)
        self._first_pass_end: float | None = None  # when the sync ending the first pass came
        self._run_fit: float | None | object = _STALE  # run_cost(), until a sample is added
        self._dest_run_fit: float | None | object = _STALE  # the destination's, the same
        self._drain_since: float | None = None  # when the switch-over began to wait for a drain
        self.drain_gave_up = False  # a drain took longer than DRAIN_BUDGET_S: the backlog counts in
        self._drain_pays = True  # the last switch-over judged a drain to pay (see _drain_would_pay)
        # [migd] the destination's own LOAD_PACE reports: its totals at the last one, and the pace
        # (bytes / busy s) of the spans between reports, of re-sends (past the first pass) and of first sends
        self._pace_last: tuple[int, int, float, float] | None = None  # bytes, pages, busy s, cpu s
        # (wall, cpu) bytes/s and the span's runs per byte (None: not reported)
        self._dest_paces: deque[tuple[float, float, float | None]] = deque(maxlen=RATE_SAMPLES)
        self._dest_first: deque[tuple[float, float, float | None]] = deque(maxlen=RATE_SAMPLES)
        # every span's (pages, bytes, cpu s): what a page and a byte cost the destination, fitted
        self._dest_spans: deque[tuple[int, int, float]] = deque(maxlen=PACE_SPANS)
        self._pace_runs: int | None = None  # the source's runs sent at the last report's bytes read
        self._dest_run_spans: deque[tuple[int, int, float]] = deque(maxlen=PACE_SPANS)  # (bytes, runs, cpu s)
        self._probe_wait_since: float | None = None  # when the switch-over began to wait for a probe
        self._rates: deque[float] = deque(maxlen=RATE_SAMPLES)  # per-window final-pass rates, bytes/s
        self.phases: dict[str, float] = {}  # ms, measured fixed costs
        self._wake_ms: deque[float] = deque(maxlen=16)
        self._sync_ms: deque[float] = deque(maxlen=5)
        self.guest = _Guest()
        self.limit_override: int | None = None  # ms, set by downtime steps / escalation
        self.throttle = 0  # % the computed throttle asked for
        self._throttle_since = start  # when it last changed
        self.actions: list[dict[str, Any]] = []  # every action so far, for query-migrate
        self._step_index = 0
        self._aborted = False
        self.state: Convergence | None = None
        self._verdict: Convergence | None = None  # the last judgement
        self._run = 0  # judgements in a row that differ from the state (the same verdict)
        self._since = start  # when the state last changed
        self._halving: bool | None = None  # the last decision's "another round pays" verdict
        self._pass_ram, self._pass_s = 0, 0.0  # RAM covered and window seconds in the first pass
        self.trace: list[list[Any]] | None = None  # every input and decision, when recording (policytrace)

    def _rec(self, *call: Any) -> None:
        if self.trace is not None:
            self.trace.append(list(call))

    # -- inputs -----------------------------------------------------------------------------------

    def on_window(self, now: float, sent_bytes: int, busy_s: float, active_s: float | None = None,
                  window_s: float | None = None, ram_bytes: int | None = None,
                  cpu_s: float | None = None, save_s: float | None = None, runs: int | None = None) -> None:
        """One rate window: bytes written, seconds inside channel writes, seconds the thread worked
        (the window minus rate-limit sleeps), the window's length, guest RAM bytes it covered, the
        thread's CPU seconds in it (recorded for the traces; the model does not use it), the
        seconds of it spent sending pages (writes included), and the runs of consecutive data pages
        it sent.

        The thread's cost per byte is only learnt from windows of mostly data pages: zero pages cost a
        scan and almost no wire bytes, and the final pass carries the pages the guest wrote. It is the
        time sending pages outside writes, when known, else all the time worked outside writes: the
        rest of a window (bitmap syncs, decisions, PINGs, drains) is no part of a final pass, and under
        a rate limit it is a large share of a short burst (200M on a 64 MiB hot set over 32 MiB/s:
        1.45 ns/B from a window's work, 0.41 in its final pass)."""
        self._rec("on_window", now, sent_bytes, busy_s, active_s, window_s, ram_bytes, cpu_s, save_s, runs)
        if save_s is not None and active_s is not None:
            active_s = max(busy_s, min(active_s, save_s))
        if sent_bytes < MIN_WINDOW_BYTES:
            return
        # a fast link with little to send spends microseconds in writes: add windows up until the
        # time inside writes says something
        self._link_bytes += sent_bytes
        self._link_busy += busy_s
        if self._link_busy >= MIN_BUSY_S:
            self.capacity.add(self._link_bytes / self._link_busy)
            self._link_bytes, self._link_busy = 0, 0.0
        data_heavy = ram_bytes is None or sent_bytes >= ram_bytes / 2
        if active_s is not None and active_s >= busy_s and not data_heavy:
            # until a window of data pages was seen: in windows with some data, the work per guest
            # RAM byte (finding a page costs about the same whatever it holds; copying is in the
            # writes); in windows of zero pages only, the work per wire byte (pessimistic: their scan
            # is charged to few bytes), so that the final pass never looks free
            assert ram_bytes is not None
            if sent_bytes >= ram_bytes * MIXED_SHARE:
                self._cpu_mixed.add((active_s - busy_s) / ram_bytes)
            self._cpu_any.add((active_s - busy_s) / sent_bytes)
        if active_s is not None and active_s >= busy_s and data_heavy:
            cost = (active_s - busy_s) / sent_bytes
            if runs is not None:
                sample = (sent_bytes, max(0, runs), active_s - busy_s)
                (self._run_first if self.in_first_pass() else self._run_samples).append(sample)
                self._run_fit = _STALE
            if not self.in_first_pass():
                self.cpu_per_byte.add(cost)
                self._cpu_recent.append(cost)
            elif self._cpu_first is None or cost < self._cpu_first:
                # first sends cost more than the re-sends a final pass carries (see final_rate): the
                # least contended of them is the closest
                self._cpu_first = cost
                self._first_rpb = max(0, runs or 0) / sent_bytes
            if self.capacity.samples and (not self.in_first_pass() or not self.cpu_per_byte.samples):
                self._rates.append(1 / (1 / self.capacity.value + cost))
        if window_s is not None and window_s > 0 and data_heavy:
            self.data_throughput.add(sent_bytes / window_s)
        if window_s is not None and window_s > 0:  # remaining counts guest RAM: so does the progress
            self.throughput.add((ram_bytes if ram_bytes is not None else sent_bytes) / window_s)
            if self.in_first_pass():
                self._pass_ram += ram_bytes if ram_bytes is not None else sent_bytes
                self._pass_s += window_s

    def on_dirty_log(self, now: float, unsynced_bytes: int) -> None:
        """A peek at the dirty log (no take): bytes the guest dirtied since the last sync."""
        self._rec("on_dirty_log", now, unsynced_bytes)
        g = self.guest
        if g.last_sync is None:
            return
        g.peeks.append((now - g.last_sync, max(0, unsynced_bytes)))
        fit = fit_dirty_log(g.peeks, float(self.ram_total or unsynced_bytes))
        if fit is not None:
            g.fit, g.fit_fresh = fit, True

    def on_sync(self, now: float, remaining_bytes: int, new_dirty_bytes: int,
                dirtied_bytes: int | None = None) -> None:
        """After a bitmap sync: what is left, what it added to the pending set, and what the guest
        dirtied since the previous sync (the dirty log's pages, pending ones included; ``new`` when
        not given). The dirty rate counts the latter: with most of RAM still pending, the pages a
        sync adds are a small part of what the guest writes (measured: 55 MiB added by a sync of a
        guest dirtying 480 MiB/s), and what is left after a round is everything it dirtied."""
        self._rec("on_sync", now, remaining_bytes, new_dirty_bytes, dirtied_bytes)
        g = self.guest
        dirtied = new_dirty_bytes if dirtied_bytes is None else max(new_dirty_bytes, dirtied_bytes)
        fresh = g.fit if g.fit_fresh else None  # an interval too short makes no fit of its own
        if g.last_sync is not None and g.syncs >= 1:
            dt = now - g.last_sync
            if dt > 0.01:
                g.dirty_rate.add(dirtied / dt)
                # the guest's own pace: distinct pages over a second undercount a guest that
                # rewrites its set within it (measured: 320 of 500 MiB/s), the fit does not
                pace = fresh[0] if fresh is not None else dirtied / dt
                g.pace.add(pace)
                if self._throttle_since <= g.last_sync:  # one throttle all through the interval
                    g.raw_rate.add(pace / max(0.01, 1 - self.throttle / 100))
        if fresh is not None and fresh[1] > 0:
            g.hot_set = int(fresh[1])
        if g.syncs == 1:  # this sync ends the first pass: the spread of first sends says nothing more
            self._rates.clear()
            self._first_pass_end = now
        if g.syncs >= 1:  # the first sync is the whole RAM
            g.working_set = max(g.working_set, remaining_bytes)
            if g.low is None or remaining_bytes < g.low * (1 - PROGRESS_STEP):
                g.low, g.low_time = remaining_bytes, now
            if not g.samples or now - g.samples[-1][0] >= SAMPLE_SPACING:
                g.samples.append((now, remaining_bytes))
                self._judge(now, remaining_bytes)
        g.last_sync = now
        g.syncs += 1
        g.peeks.clear()
        g.fit_fresh = False

    def in_first_pass(self) -> bool:
        """Before the sync that ends the first pass (the setup's sync is the first)."""
        return self.guest.syncs < 2

    def on_rtt(self, seconds: float, lower_bound: bool = False, behind_bytes: int = 0,
               queued_bytes: int = 0, burst_s: float = 0.0, drained: bool = False) -> None:
        """A PING's round trip; with ``lower_bound``, the age of a PING not answered yet: the round
        trip is at least that. With ``behind_bytes``, the PING followed that many bytes sent after
        the destination had caught up, and ``seconds`` counts from the first of them: beyond the
        plain round trip, the time they took from the source's scan to the destination's load — a
        sample of the final pass's pace end to end. ``queued_bytes``: what the socket still held
        for the destination to read when the PING went out; a PONG that waited behind a backlog
        (``on_backlog`` counts it) is no sample of the round trip (measured: 82 ms behind 2.5 MB,
        against a LOADED that took 8.8 ms). ``burst_s``: how long the probe's burst took to write
        (0 = not known): a destination that answered within PROBE_LAG of it kept up with the source,
        so the probe timed the source's pace with the vCPUs running, not the destination's, and it
        bounds nothing (measured: probes of 196-309 MB/s, a final pass at 680). ``drained``: a PING
        sent as a ``DRAIN`` ended, into an empty socket to a destination with nothing left to load —
        the round trip as the switch-over will find it, which then stands for all others (16M at
        50 ms: the quartile of PINGs answered by a busy destination said 7-10 ms, LOADED and SHUT
        took 1-1.5)."""
        self._rec("on_rtt", seconds, lower_bound, behind_bytes, queued_bytes, burst_s, drained)
        if lower_bound:
            self._rtt_floor = max(0.0, seconds)
            return
        self._rtt_floor = 0.0
        base = min(self._rtt) if self._rtt else 0.0  # the wire's own round trip
        if not behind_bytes:
            if queued_bytes < MIN_WINDOW_BYTES:
                self._rtt.append(max(0.0, seconds))
                if drained:
                    self._rtt_drained = max(0.0, seconds)
            return
        if behind_bytes >= MIN_WINDOW_BYTES and seconds - base > MIN_BUSY_S:
            self._probed = self._probed or not self.in_first_pass()
            if burst_s > 0 and seconds - base - burst_s < PROBE_LAG * burst_s:
                return  # the source's pace: the destination kept up
            # the destination loaded what the socket held ahead of the PING too, when it had not
            # caught up before the burst
            rate = max(behind_bytes, queued_bytes) / (seconds - base)
            if self.in_first_pass():
                self._load_first = max(self._load_first, rate)
            else:
                self._load_rates.append(rate)

    def on_load_pace(self, now: float, bytes_read: int, pages: int, busy_s: float, wait_s: float,
                     cpu_s: float, runs: int | None = None) -> None:
        """A LOAD_PACE report: the destination's incoming thread's totals since it accepted the
        connection — bytes read, RAM pages loaded, seconds busy (not waiting for data), waiting, and
        on a CPU. A span of data pages between two reports gives its pace, bytes / busy s (how fast
        the destination loads when the source keeps up, the CPU shared as it was) and bytes / CPU s
        (how fast it loads with a CPU of its own, as once the source's vCPUs stop). ``runs``: the
        runs of data pages the source had sent up to ``bytes_read`` (its own count): a run costs the
        destination far more than its bytes (a scratch loader, 40 MB in one run: 12 ms of CPU; in
        runs of 7.5 pages: 33 ms; of 2.5: 51 ms)."""
        self._rec("on_load_pace", now, bytes_read, pages, busy_s, wait_s, cpu_s, runs)
        last, self._pace_last = self._pace_last, (bytes_read, pages, busy_s, cpu_s)
        last_runs, self._pace_runs = self._pace_runs, runs
        if last is None:
            return
        sent, loaded, busy, cpu = bytes_read - last[0], pages - last[1], busy_s - last[2], cpu_s - last[3]
        data = sent >= MIN_WINDOW_BYTES and sent >= loaded * PAGE_SIZE / 2 and cpu > PACE_MIN_BUSY_S
        span_rpb = None
        if data and runs is not None and last_runs is not None and runs >= last_runs:
            self._dest_run_spans.append((sent, runs - last_runs, cpu))
            self._dest_run_fit = _STALE
            span_rpb = (runs - last_runs) / sent
        if cpu > PACE_MIN_BUSY_S and (sent or loaded):
            self._dest_spans.append((loaded, sent, cpu))
        if sent < MIN_WINDOW_BYTES or busy < PACE_MIN_BUSY_S or sent < loaded * PAGE_SIZE / 2 or not loaded:
            # too little to tell, mostly zero pages (work, but few bytes), or no pages at all: the
            # stream's start (64 KiB and no page in 4.7 ms, 16M at 50 ms: a "pace" of 14 MB/s and a
            # final pass of 0.17 MB expected at 12 ms for 1.4)
            return
        cpu_rate = sent / cpu if cpu > PACE_MIN_BUSY_S else sent / busy
        (self._dest_first if self.in_first_pass() else self._dest_paces).append((sent / busy, cpu_rate, span_rpb))

    def dest_pace(self, cpu: bool = False) -> float:
        """Bytes/s the destination loads data pages at, from its reports (0 = none): the median of
        the last spans of re-sends (past the first pass; during it, of its spans); ``cpu``: on a CPU
        of its own."""
        samples = self._dest_samples()
        if not samples:
            return 0.0
        return _lower_median(c if cpu else w for w, c, _ in samples)

    def _dest_samples(self) -> deque[tuple[float, float, float | None]] | tuple[()]:
        """The destination's (wall, cpu) paces the model counts on: its spans of re-sends, or during
        the first pass its spans of first sends."""
        return self._dest_paces or (self._dest_first if self.in_first_pass() else ())

    def drain_rate(self) -> float:
        """Bytes/s the destination loads data pages at with a CPU of its own — the pace at which,
        once the vCPUs stopped, it drains what the socket holds (0 = not known). Its spans of data
        pages (before one of re-sends, of first sends), else the least-squares fit of every span's
        CPU time to ``a pages + b bytes`` (a run of mostly zero pages and a few data pages shows both
        costs): a data page costs ``a + 4096 b``.
        Measured at the switch-over of 64M over 128 MiB/s: 3.1 MB drained in 8 ms, the CPU pace said
        267 MB/s, the wall pace 97; 64M unlimited: 4.4 MB in 11 ms, the CPU pace 365."""
        rate = self.dest_pace(cpu=True)
        if rate <= 0 and self._dest_first:  # no re-send measured yet: first sends, which cost more
            rate = _lower_median(c for _, c, _ in self._dest_first)
        if rate > 0 or len(self._dest_spans) < 3:
            return rate
        fit = _least_squares(self._dest_spans, 1e-9)
        if fit is None:  # every span had the same mix: the two costs cannot be told apart
            return 0.0
        per_page, per_byte = fit
        cost = max(0.0, per_page) / PAGE_SIZE + per_byte
        if per_byte <= 0 or cost <= 0:
            return 0.0
        # a span's data pages took at most all of its CPU: the destination loads data at least at
        # the best span's bytes / CPU s, whatever the fit of near-alike spans says (64M over 128 MiB/s:
        # 82 MB/s fitted to spans of 13.4 MB in 30-46 ms, 218 ms expected for 2; its first span of
        # data pages then said 588)
        return max(1 / cost, max(sent / cpu for _, sent, cpu in self._dest_spans if cpu > 0))

    def on_backlog(self, queued_bytes: int) -> None:
        """Before each decision: bytes the socket holds that the destination has not read yet (0 where
        the channel cannot tell). The switch-over's LOADED comes only once they are loaded too."""
        self._rec("on_backlog", queued_bytes)
        self.backlog = max(0, queued_bytes)

    def on_layout(self, remaining_bytes: int, runs: int, reference_share: float) -> None:
        """After a sync near a switch-over, how what is left lies: its runs of consecutive dirty
        pages (a page alone costs more than its share of a long run: 500M unlimited, a first pass
        of long runs at 0.36 ns/B, its final pass of scattered pages at 1.39), and the share of it
        in runs long enough to leave a unix socket as page references (0 where the final pass
        copies everything). Those bytes cost the source no copy into the socket; the destination
        copies them, and its pace bounds the final pass anyway (200M on a 64 MiB hot set over
        32 MiB/s: 63 MB of one run, written at 7.7 GB/s, where copying writes under the cap said 3.0)."""
        self._rec("on_layout", remaining_bytes, runs, reference_share)
        self.reference_share = min(1.0, max(0.0, reference_share))
        self._final_rpb = max(0, runs) / remaining_bytes if remaining_bytes > 0 else None

    def on_references(self, references: bool) -> None:
        """Whether a final pass would send its long runs as page references (one channel, page runs
        accepted, a plain unix socket: the thread's ``_final_by_reference``), once it is known and
        whenever it changes: what the layout of a final pass no sync has shown yet is worth."""
        self._rec("on_references", references)
        self.references = bool(references)

    def on_phase(self, name: str, ms: float) -> None:
        """A measured fixed cost: ``stop-vcpus``, ``drive-flush``, ``sync``, ``device-state``,
        ``other``, or ``wake`` (a thread wake-up latency sample, the stop's prior)."""
        self._rec("on_phase", name, ms)
        if name == "wake":
            self._wake_ms.append(max(0.0, ms))
        elif name == "sync":  # one descheduled sync is not what the final one will cost
            self._sync_ms.append(max(0.0, ms))  # the lower median: of two, the faster (22 ms and 0.4)
            self.phases[name] = _lower_median(self._sync_ms)
        else:
            self.phases[name] = max(0.0, ms)

    # -- the model --------------------------------------------------------------------------------

    def limit_ms(self) -> int:
        limit = int(self._params()["downtime-limit"])
        return max(limit, self.limit_override) if self.limit_override is not None else limit

    def final_rate(self) -> float:
        """Bytes/s the final pass will run at (0 = not known yet)."""
        avail = int(self._params()["avail-switchover-bandwidth"])
        if avail:
            return float(avail)
        if not self.capacity.samples:
            return 0.0
        if self._cpu_recent:  # the median: one descheduled window (measured: 2.5 ns/B average, 1.0 median)
            cpu = sorted(self._cpu_recent)[len(self._cpu_recent) // 2]
            cpu += self._scatter_cost(cpu, self._median_rpb(self._run_samples))
        elif self._cpu_first is not None:
            cpu = self._cpu_first + self._scatter_cost(self._cpu_first, self._first_rpb if self._run_first else None)
        else:
            cpu = next((e for e in (self._cpu_mixed, self._cpu_any) if e.samples), self._cpu_any).value
        per_byte = (1 - self.reference_share) / self.capacity.value + max(0.0, cpu)
        rate = 1 / max(per_byte, 1e-11)  # no pass is free: 100 GB/s at most
        # the final pass goes no faster than the slower end: the pace the destination loads at with
        # a CPU of its own, from its LOAD_PACE reports; without them, the end-to-end probes (which
        # time a capped burst through every buffer: 44 MB/s for a final pass at 164, 64M over 128 MiB/s)
        bound = self._final_load_rate() or self.load_rate()
        return min(rate, bound) if bound > 0 else rate

    def _final_load_rate(self) -> float:
        """The destination's pace for the final pass: its drain rate, at the runs per byte of the
        final pass (``on_layout``) rather than of the spans it was measured on — the fitted cost of
        a run to the destination (until one is fitted, DEST_PRIOR_RUN_S), never below half the
        spans' cost per byte (200M on a 64 MiB hot set over 128 MiB/s: spans of 6-9 pages a run at
        1.1-1.7 GB/s, a final pass of 3.3 pages a run loaded at 0.68 GB/s, CPU-bound)."""
        rate = self.drain_rate()
        if rate <= 0 or self._final_rpb is None:
            return rate
        spans = self._dest_run_spans
        measured = self._drain_rpb()
        if measured is None:
            measured = self._median_rpb(spans)
        if measured is None:
            return rate
        if self._dest_run_fit is _STALE:
            self._dest_run_fit = _fit_run_cost(spans)
        per_run = cast("float | None", self._dest_run_fit) or DEST_PRIOR_RUN_S
        cost = 1 / rate
        return 1 / max(cost / 2, cost + per_run * (self._final_rpb - measured))

    def _drain_rpb(self) -> float | None:
        """The runs per byte of the span whose pace ``drain_rate`` counts on (None: not reported, or
        the rate is the fit's): the final pass's cost differs from that span's by its runs, not from
        the median of every span, first sends included (200M on a 64 MiB hot set over 128 MiB/s:
        the drain rate from a re-send span of 38 runs per MB, the median span 1.5; a final pass of
        74 runs per MB expected at 0.60 GB/s, loaded at 1.2)."""
        paces = self._dest_paces or self._dest_first
        if not paces:
            return None
        ranked = sorted(paces, key=lambda pace: pace[1])  # by the pace on a CPU of its own
        return ranked[(len(ranked) - 1) // 2][2]

    def run_cost(self) -> float | None:
        """Seconds a run of pages costs the thread beyond its bytes: the least-squares fit of the
        data windows' page work to ``a bytes + b runs`` (None while every window had the same mix,
        or the fit makes no sense)."""
        if self._run_fit is _STALE:  # final_rate asks many times per decision: fitted once per sample
            self._run_fit = _fit_run_cost([*self._run_first, *self._run_samples])
        return cast("float | None", self._run_fit)

    @staticmethod
    def _median_rpb(samples: deque[tuple[int, int, float]]) -> float | None:
        """The windows' median runs per byte (None: they did not report runs)."""
        rpb = sorted(r / b for b, r, _ in samples)
        return rpb[len(rpb) // 2] if rpb else None

    def _scatter_cost(self, cost: float, measured_rpb: float | None) -> float:
        """What the final pass costs per byte more (or less) than windows of ``measured_rpb`` runs
        per byte did: its own runs per byte (``on_layout``) at the fitted cost of a run (until one
        is fitted, PRIOR_RUN_S); never below half the measured cost."""
        per_run = self.run_cost() or PRIOR_RUN_S
        if self._final_rpb is None or measured_rpb is None:
            return 0.0
        return max(-cost / 2, per_run * (self._final_rpb - measured_rpb))

    def load_rate(self) -> float:
        """Bytes/s a burst went at from the source's scan to the destination's load (the median of
        the last five probes; 0 = not measured). Under a rate limit the writes land in socket
        buffers and never show the far end, and a sustained final pass runs at the slower of the
        two (measured: 4 GB/s into the buffer, 460 MB/s end to end). The fastest probe would be
        closer for a busy guest (the running vCPUs' share of the interpreter slows a probe, not
        the final pass), but on a loaded host a final pass also ran at 170 MB/s where the fastest
        probe said 650: the median errs to the safe side. Probes of the first pass count only until
        it ends, as their fastest: first sends are slower end to end than the re-sends of a final
        pass (measured: 55 MB/s in the first pass, 631 after it, 650 in the final pass)."""
        if not self._load_rates:
            return self._load_first if self.in_first_pass() else 0.0
        return _lower_median(self._load_rates)  # of two, the slower

    def fixed_parts(self) -> dict[str, float]:
        """The switch-over's fixed costs (ms) as the model sees them now, by name."""
        p = self.phases
        if "stop-vcpus" in p:
            stop = p["stop-vcpus"]
        elif self._wake_ms:
            stop = 2 * sorted(self._wake_ms)[len(self._wake_ms) // 2]
        else:
            stop = PRIOR_STOP_MS
        return {"stop-vcpus": stop, "drive-flush": p.get("drive-flush", 0.0), "sync": p.get("sync", 0.0),
                "device-state": p.get("device-state", 0.0), "other": p.get("other", PRIOR_OTHER_MS),
                "round-trip": self.rtt_ms() * self.round_trips}

    def rtt_ms(self) -> float:
        """The lower quartile of the last five round trips: a PONG queued behind the stream waited for the
        destination to load a backlog that the final pass's own rate already counts (measured: 208 ms
        on a loaded machine against a 0.8 ms wait for LOADED); never below the age of a PING
        unanswered for FLOOR_AFTER_S (or of the first one)."""
        if not self._rtt:
            return self._rtt_floor * 1000
        # once a PONG came, a PING still out says something only when it is out for long
        floor = self._rtt_floor if self._rtt_floor >= FLOOR_AFTER_S else 0.0
        if self._rtt_drained is not None:  # the last one measured in the switch-over's conditions
            return max(self._rtt_drained, floor) * 1000
        low = sorted(self._rtt)[len(self._rtt) // 4]  # of five, the second smallest: a PONG can race its stamp
        return max(low, floor) * 1000

    def fixed_ms(self) -> float:
        """The switch-over's cost with nothing left to send."""
        return sum(self.fixed_parts().values())

    def expected_downtime_ms(self, remaining_bytes: int, fallback_rate: float = 0.0) -> int:
        """The downtime of the switch-over this policy plans (the number the log and query-migrate
        both print): ``fixed + final pass / final-pass rate``, where the final pass is what the model
        predicts will be left when the decision comes (``planned_final``) — at the switch-over, the
        remaining itself. Before the first window, ``fallback_rate`` (bytes/s, e.g. the average since
        the start) stands in for the final-pass rate; with neither, the limit is QEMU's first guess."""
        with self._layout_of_unseen_rest(remaining_bytes):
            fixed = self.fixed_ms()
            final, _ = self._planned(remaining_bytes)
            drain_ms = self.backlog_ms()  # the destination loads what the socket holds before the final pass
            if final <= 0:
                return int(round(fixed + drain_ms))
            rate = self.final_rate() or fallback_rate
            if rate <= 0:
                return self.limit_ms()
            return int(round(fixed + drain_ms + final / rate * 1000))

    @contextmanager
    def _layout_of_unseen_rest(self, remaining: int) -> Iterator[None]:
        """Until a sync near a switch-over showed the layout of what is left (``on_layout``), the
        estimate plans a final pass laid out as a uniform writer leaves it (the dirty log's fit
        assumes one): what the first pass leaves, or the next sync will find, a share ``f`` of the
        set the guest writes, lies in runs that end where a dirty page is followed by a clean one,
        ``(1 - f) / page`` runs per byte, and its long runs leave as page references where they can.
        Otherwise a capped first pass plans copying writes: the anchor (500M over 100 MiB/s)
        expected 1-3 ms after its first second, at 1.6 GB/s, where 486 MB in long runs went at
        2.4 GB/s in 203 ms. The threshold it plans with is the one past the first pass, whose sync
        forgets the spread of first sends (``decision_rate``). Only the published estimate: no
        decision is made before that sync, which brings the real layout when it matters. The layout
        is set for the estimate's computation and restored after it (final_rate, threshold and the
        plan all read it from the policy)."""
        pace = self.guest_pace()
        if self._final_rpb is not None or pace is None:
            yield
            return
        wss = float(pace[1] or self.ram_total)
        if self.in_first_pass():
            left = self._first_pass_leaves(remaining)
        else:  # past it, until a sync near the switch-over shows the layout: what the next sync finds
            left = remaining + (self.guest.peeks[-1][1] if self.guest.peeks else 0)
        share = min(1.0, left / wss) if wss > 0 else 0.0
        saved = self.reference_share, self._final_rpb
        self.reference_share = run_share(share, REFERENCE_RUN) if self.references else 0.0
        self._final_rpb = (1 - share) / PAGE_SIZE
        self._past_first_pass = self.in_first_pass()
        try:
            yield
        finally:
            self.reference_share, self._final_rpb = saved
            self._past_first_pass = False

    def backlog_ms(self, drained: bool | None = None) -> float:
        """What loading the socket's backlog adds to the downtime: DRAIN_MS at most when the
        switch-over drains it first (``drained``; by default, as the last decision judged), else
        all of ``full_backlog_ms``."""
        full = self.full_backlog_ms()
        if drained is None:
            drained = self._drain_pays and not self.drain_gave_up
        return min(full, DRAIN_MS) if drained else full

    def _drain_would_pay(self, remaining: int) -> bool:
        """Whether the pages the guest dirties while the destination loads the backlog still fit the
        threshold after it: draining lets a guest at the edge of converging dirty more (500M
        unlimited at 300 ms no longer converged in 20 s when every switch-over drained first)."""
        pace = self.guest_pace()
        seconds = self.full_backlog_ms() / 1000
        if pace is None:
            return True
        rate, wss = pace
        more = dirtied_by((rate, float(wss)), seconds) if wss else rate * seconds
        return remaining + more <= self.threshold(drained=True)

    def full_backlog_ms(self) -> float:
        """The time the destination takes to load the socket's backlog: at its drain rate when it
        reports one (under a rate limit too: the last burst may still sit in the socket, 7.5 MB
        measured at 128 MiB/s); without reports, at the link capacity and only without a rate
        limit (under one the destination mostly catches up while the thread sleeps)."""
        if not self.backlog:
            return 0.0
        drain = self.drain_rate()
        if drain > 0:
            return self.backlog / drain * 1000
        if int(self._params()["max-bandwidth"]) or not self.capacity.samples or self.capacity.value <= 0:
            return 0.0
        return self.backlog / self.capacity.value * 1000

    def drain_target(self) -> int:
        """Bytes the socket may hold at a switch-over, more is drained first: what the destination
        loads in half of DRAIN_MS at its pace, else at the link capacity (64 KiB at least)."""
        rate = self.drain_rate() or (self.capacity.value if self.capacity.samples else 0.0)
        return max(64 << 10, int(rate * DRAIN_MS / 2000))

    def planned_final(self, remaining: int) -> float:
        """What will be left at the switch-over, if the guest keeps its pace: the decision replayed
        on the model, round by round; during the first pass, from what the dirty log will hold when
        it ends. A remaining that does not shrink is its own answer."""
        return self._planned(remaining)[0]

    def _planned(self, remaining: int) -> tuple[float, float | None]:
        """``planned_final`` and the bytes of the live round before it (None: no more rounds; the
        first pass's rest counts as one)."""
        r = float(remaining)
        if self.guest_pace() is None:
            return r, None  # the guest's pace is not known yet: the switch-over as if it came now
        if self.in_first_pass():
            r = self._first_pass_leaves(remaining)
        elif self.guest.peeks:  # between syncs: the next one adds what the dirty log holds
            r += self.guest.peeks[-1][1]
        # the rest of this pass is sent before the next sync: a round of its own
        current = float(remaining) if self.in_first_pass() or self.guest.peeks else None
        threshold = self.threshold()
        final, last = self._plan(r, threshold, 1.0)
        p = self._params()
        if final > threshold and p.get("x-migd-auto-throttle", False) and not self._aborted:
            # it will not fit as the guest goes: the computed throttle will slow it down
            need = self.needed_throttle(p)
            if need > self.throttle:
                final, last = self._plan(r, threshold, (1 - need / 100) / max(0.01, 1 - self.throttle / 100))
        # a plan that never fits: the switch-over, if it comes, comes within the threshold (the
        # decision makes none above it; x-migd-convergence says whether it comes) — the threshold
        # of a steady rate, not of this moment's spread, which first sends widen (measured: 500M
        # unlimited at 50 ms switched over after 17 s with 30 ms, planned at 800 before; 200M on a
        # 64 MiB hot set over 32 MiB/s, 244 ms at 57 MB, 661 planned during the first pass)
        if final > threshold:
            rate = self.final_rate()
            if not int(p["avail-switchover-bandwidth"]):
                rate *= 1 - MIN_SPREAD
            final = min(final, max(0.0, self.limit_ms() - self.fixed_ms() - self.backlog_ms()) / 1000 * rate)
        return final, current if last is None else last

    def _plan(self, r: float, threshold: int, scale: float) -> tuple[float, float | None]:
        """The decision replayed from ``r``, the guest's pace scaled by ``scale``: the final pass,
        and the last live round's bytes (None: none)."""
        last: float | None = None
        for _ in range(PLAN_ROUNDS):
            if r <= threshold and not self._another_round_pays(int(r), scale=scale):
                return r, last
            following = self._next_round(int(r), scale)
            if not following < r:
                return r, last
            last, r = r, following
        return r, last

    def guest_pace(self) -> tuple[float, int] | None:
        """(dirty rate bytes/s, working set bytes, 0 = not bounded) the plan counts on: the pace
        averaged over the intervals between syncs (each one's fit of the dirty log, or its distinct
        pages when too short for a fit), unthrottled and throttled again at the current throttle;
        before the first of them the dirty log's fit."""
        g = self.guest
        if g.raw_rate.samples:  # as the guest goes under the throttle it has now
            return g.raw_rate.value * (1 - self.throttle / 100), g.hot_set or g.working_set
        if g.pace.samples:
            return g.pace.value, g.hot_set or g.working_set
        if g.fit is not None:
            rate, wss = g.fit
            return rate, max(int(wss), g.working_set)
        return None

    def _first_pass_leaves(self, remaining: int) -> float:
        """What the sync ending the first pass will find: all the guest dirtied since the log
        started, at the time the rest of the pass takes at its pace so far."""
        g = self.guest
        if g.fit is None:
            return float(remaining)
        pace = self._pass_ram / self._pass_s if self._pass_s > 0 else 0.0
        if pace <= 0:
            return float(remaining)
        age = g.peeks[-1][0] if g.peeks else 0.0
        return dirtied_by(g.fit, age + remaining / pace)

    def decision_rate(self) -> float:
        """The final-pass rate the switch-over decision counts on: the slower quartile of the recent
        windows (a noisy machine), and at least MIN_SPREAD below the estimate, so that a downtime
        the estimate puts at the limit does not end above it. A user-given rate is taken as given."""
        rate = self.final_rate()
        if int(self._params()["avail-switchover-bandwidth"]):
            return rate
        floor = rate * (1 - MIN_SPREAD)
        if self._past_first_pass:  # as the sync ending the first pass leaves it: no spread known yet
            return floor
        if len(self._rates) >= 4:
            floor = min(floor, sorted(self._rates)[len(self._rates) // 4])
        dest = self._dest_samples()
        if len(dest) >= 4:  # ... and of the destination's own pace as it goes (the CPU shared as it is)
            floor = min(floor, sorted(w for w, _, _ in dest)[len(dest) // 4])
        return floor

    def threshold(self, drained: bool | None = None) -> int:
        """Bytes a final pass may carry within the downtime limit, after the fixed costs and the
        backlog the destination loads first (a switch-over is never decided with a forecast above
        the limit); ``drained`` as for ``backlog_ms``."""
        budget = self.limit_ms() - self.fixed_ms() - self.backlog_ms(drained)
        return int(max(0.0, budget) / 1000 * self.decision_rate())

    def _round_s(self, remaining: int) -> float:
        """A live round's length: sending ``remaining`` at the throughput, and never less than the
        bitmap sync that ends it."""
        if self.data_throughput.samples:
            rate = self.data_throughput.value
        else:  # no round of data pages yet: the final pass's pace, held to the rate limit
            cap = int(self._params()["max-bandwidth"])
            rate = min(self.final_rate(), float(cap)) if cap else self.final_rate()
        if rate <= 0:
            return math.inf
        return max(remaining / rate, self.phases.get("sync", 0.0) / 1000)

    def _next_round(self, remaining: int, scale: float = 1.0) -> float:
        """What one more live round is predicted to leave (the guest's pace scaled by ``scale``):
        the distinct pages a fitted guest dirties in it, else rate x time, at most the set."""
        pace = self.guest_pace()
        if pace is None:
            return math.inf
        rate, wss = pace
        seconds = self._round_s(remaining)
        if wss:  # uniform writes over the set: distinct pages
            return dirtied_by((rate * scale, float(wss)), seconds)
        dirtied = rate * scale * seconds
        return min(dirtied, float(wss)) if wss else dirtied

    # -- the decision -----------------------------------------------------------------------------

    def decide(self, now: float, remaining_bytes: int, exact: bool) -> Decision:
        """Every loop turn: iterate, ask for a sync, or switch over; plus the built-in policy's acts."""
        self._rec("decide", now, remaining_bytes, exact)
        actions = tuple(self._builtin(now, remaining_bytes))
        if any(a.action == "abort" for a in actions):
            return Decision(Step.ITERATE, actions)
        threshold = self.threshold()
        if self.in_first_pass() and remaining_bytes > 0:
            # the first pass ends before any switch-over: what it has still to send is unknown
            # (zero pages or data; live, it costs the guest nothing), and the plan counts on it
            return Decision(Step.ITERATE, actions)
        if remaining_bytes > threshold:
            self._drain_since = None  # a new round: the next switch-over may drain again
            self._drain_pays = True
            g = self.guest
            if not exact and g.syncs >= 2 and g.last_sync is not None and now - g.last_sync >= SYNC_INTERVAL:
                return Decision(Step.SYNC, actions)
            return Decision(Step.ITERATE, actions)
        if not exact:
            return Decision(Step.SYNC, actions)
        if remaining_bytes and self._another_round_pays(remaining_bytes, commit=True):
            return Decision(Step.ITERATE, actions)
        self.waiting_for_peer = self.peer_answers and not self._rtt
        if (self.waiting_for_peer or self._wait_for_probe(now, remaining_bytes)
                or self._wait_for_resend(now, remaining_bytes)):
            return Decision(Step.ITERATE, actions)
        if not self.drain_gave_up and self.backlog > self.drain_target():
            # the destination loads the backlog while the guest runs, not inside the downtime (also
            # when its pace is not known yet: a first pass done within the first window left 6 MB
            # in the socket, 21 ms of waiting for LOADED) — when what the guest dirties meanwhile
            # still fits; else the switch-over goes ahead with the backlog, if the backlog and the
            # rest fit in the limit (an empty threshold is no fit: 0 left with 7 MB queued at
            # 45 MB/s made 32 ms for 50 expected 8), and drains when nothing fits
            self._drain_pays = self._drain_would_pay(remaining_bytes)
            if not self._drain_pays:
                budget = self.limit_ms() - self.fixed_ms() - self.full_backlog_ms()
                if budget > 0 and remaining_bytes <= self.threshold(drained=False):
                    return Decision(Step.SWITCHOVER, actions)
                self._drain_pays = True  # nothing fits without it: the destination must catch up
            if self._drain_since is None:
                self._drain_since = now
            if now - self._drain_since <= DRAIN_BUDGET_S:
                return Decision(Step.DRAIN, actions)
            self.drain_gave_up = True  # it does not drain: decide again with the backlog counted in
            return Decision(Step.ITERATE, actions)
        if self._wants_quiet_rtt():
            self._quiet_rtt_asked = True
            return Decision(Step.DRAIN, actions)
        return Decision(Step.SWITCHOVER, actions)

    def _wants_quiet_rtt(self) -> bool:
        """Once, before the first switch-over with no round trip timed as the switch-over will find
        it (a PING into an empty socket, the destination idle): a DRAIN of the already small backlog
        times one. The PINGs before it went out with the header, to a destination just starting, or
        to one busy loading, and said 4-6 ms where the switch-over's LOADED and SHUT took 0.4-1 ms
        each (an idle guest at 50 ms: 14 ms expected for 2). It costs the guest one round trip of
        running on."""
        return (self.times_quiet_rtt and self.peer_answers and not self._quiet_rtt_asked
                and self._rtt_drained is None)

    def _wait_for_probe(self, now: float, remaining: int) -> bool:
        """Under a rate limit, with data pages that matter to send in the final pass, the first
        switch-over waits (PROBE_WAIT_S at most, the guest running) for one probe of the pace end
        to end: until then the final pass's rate is the socket buffer's (measured: 1.4 GB/s
        expected, 384 MB/s real, for 52 MB after a first pass of mostly zero pages). The
        destination's own pace of *re-sent* data pages stands in for the probe; its first-pass
        spans and its fitted costs do not (200M on a 64 MiB hot set over 128 MiB/s: 2-5 GB/s
        reported for first sends, a switch-over right after the first pass, and its 48 MB final
        pass at 0.9 GB/s: 52-58 ms against a 50 ms limit in 4 of 5 runs, bench/traces)."""
        p = self._params()
        if (self._probed or not self.peer_answers or not int(p["max-bandwidth"])
                or int(p["avail-switchover-bandwidth"]) or self._dest_paces):
            return False  # (with the destination's pace of re-sends reported, no probe is needed)
        rate = self.final_rate()
        if rate <= 0 or remaining / rate * 1000 < RAM_MATTERS * self.fixed_ms():
            return False
        if self._probe_wait_since is None:
            self._probe_wait_since = now
        return now - self._probe_wait_since < PROBE_WAIT_S

    def _wait_for_resend(self, now: float, remaining: int) -> bool:
        """The first switch-over waits (RESEND_WAIT_S at most after the first pass, the guest
        running) for a window of re-sent pages when what is left lies in more than twice as many
        runs per byte as the first pass sent and the RAM part matters: until then the cost of a run
        is not known (500M unlimited switched over as its first pass ended, 233 MB of scattered
        pages expected at the first pass's 0.36 ns/B: 199 ms expected, 438 real)."""
        if (self._run_samples or self._final_rpb is None or not self._run_first
                or self._first_pass_end is None or now - self._first_pass_end > RESEND_WAIT_S):
            return False
        if self._final_rpb <= 2 * max(r / b for b, r, _ in self._run_first):
            return False
        rate = self.final_rate()
        return rate > 0 and remaining / rate * 1000 >= RAM_MATTERS * self.fixed_ms()

    def peer_silent(self) -> None:
        """The PING went unanswered for too long: stop waiting for a round trip before switching."""
        self._rec("peer_silent")
        self.peer_answers = False

    def _another_round_pays(self, remaining: int, commit: bool = False, scale: float = 1.0) -> bool:
        """Whether one more live round leaves at most HALVING of ``remaining`` (and the RAM part of
        the downtime still matters). The verdict the decision last reached (``commit``) holds until
        the ratio is HALVING_BAND past HALVING the other way: a guest whose rounds shrink by about
        HALVING gets one plan, not one per sync, and the plan replay follows the same verdict."""
        rate = self.final_rate()
        ram_ms = remaining / rate * 1000 if rate > 0 else 0.0
        if ram_ms < RAM_MATTERS * self.fixed_ms():
            return False
        bound = HALVING
        if self._halving is not None:
            bound *= 1 + HALVING_BAND if self._halving else 1 - HALVING_BAND
        pays = self._next_round(remaining, scale) <= bound * remaining
        if commit:
            self._halving = pays
        return pays

    # -- the forecast -----------------------------------------------------------------------------

    def asymptote(self) -> float | None:
        """Where remaining is heading, from its last three samples (about a second apart): the limit
        of a geometric approach (Aitken's extrapolation) when the steps shrink, -inf when it falls
        steadily, None when it does not fall."""
        pts = self.guest.samples
        if len(pts) < 3:
            return None
        (_, r0), (_, r1), (_, r2) = pts
        d1, d2 = r1 - r0, r2 - r1
        if d1 >= 0 or d2 >= 0:
            return None
        if d2 / d1 >= 0.95:
            return -math.inf
        return r2 - d2 * d2 / (d2 - d1)

    def _judge(self, now: float, remaining: int) -> None:
        """At a sync: converging, stalled or diverging. A state holds HOLD_S at least, and is left
        after LEAVE_AFTER judgements in a row for another one; except that a remaining within the
        threshold is converging at once (a fact, not a trend)."""
        threshold = self.threshold()
        send = self.throughput.value if self.throughput.samples else 0.0
        limit_of = self.asymptote()
        if remaining <= threshold:
            verdict = Convergence.CONVERGING
        elif send <= 0 or (self.guest.low is not None and now - self.guest.low_time >= STALL_S
                           and limit_of is not None and limit_of <= threshold):
            verdict = Convergence.STALLED  # nothing moves, or the trend says yes and the data says no
        elif len(self.guest.samples) < 3:
            verdict = self.state or Convergence.CONVERGING
        elif limit_of is None or limit_of > threshold:
            verdict = Convergence.DIVERGING  # not falling, or falling towards a level that never fits
        else:
            verdict = Convergence.CONVERGING
        if verdict is self.state:
            self._run = 0
        else:
            self._run = self._run + 1 if verdict is self._verdict else 1
            settled = self.state is None or (self._run >= LEAVE_AFTER and now - self._since >= HOLD_S)
            if settled or (verdict is Convergence.CONVERGING and remaining <= threshold):
                self.state, self._since, self._run = verdict, now, 0
        self._verdict = verdict

    def forecast(self, now: float, remaining_bytes: int) -> dict[str, Any]:
        """``x-migd-convergence``: state, eta-ms, dirty-rate (bytes/s), working-set (bytes), and what
        they were judged against (throughput, threshold, link capacity, final-pass rate)."""
        g = self.guest
        dirty = g.dirty_rate.value if g.dirty_rate.samples else 0.0
        send = self.throughput.value if self.throughput.samples else self.final_rate()
        threshold = self.threshold()
        if self.state is None:  # nothing judged yet: converging until the syncs say otherwise
            self.state, self._since = Convergence.CONVERGING, now
        state = self.state
        out: dict[str, Any] = {"state": str(state), "dirty-rate": int(dirty), "working-set": g.working_set,
                               "throughput": int(send),
                               "threshold": threshold, "link-capacity": int(self.capacity.value),
                               "final-rate": int(self.final_rate())}
        if state is Convergence.CONVERGING:
            net = send - dirty
            if remaining_bytes <= threshold:
                out["eta-ms"] = 0
            elif net > 0:
                out["eta-ms"] = int((remaining_bytes - threshold) / net * 1000)
        return out

    # -- the built-in convergence policy --------------------------------------------------------

    def _builtin(self, now: float, remaining: int) -> list[Action]:
        p = self._params()
        acts: list[Action] = []
        if self._aborted:
            return acts
        gib = max(self.ram_total / GIB, 1 / 1024)
        elapsed = now - self.start
        completion = int(p.get("x-migd-completion-timeout", 0))
        if completion and elapsed > completion * gib:
            acts.append(self._record(now, Action("abort", 0, f"Migration did not complete within "
                                                 f"{completion} s per GiB (x-migd-completion-timeout)")))
            self._aborted = True
            return acts
        steps = int(p.get("x-migd-downtime-steps", 0))
        if steps:
            max_ms = int(p.get("x-migd-downtime-max", 0)) or 500
            delay = int(p.get("x-migd-downtime-step-delay", 0)) or 75
            schedule = nova_schedule(int(p["downtime-limit"]), max_ms, steps, delay * gib)
            while self._step_index < len(schedule) and elapsed >= schedule[self._step_index][0]:
                value = schedule[self._step_index][1]
                self._step_index += 1
                if value > self.limit_ms():
                    self.limit_override = value
                    acts.append(self._record(now, Action("downtime-limit", value,
                                                         f"downtime step {self._step_index - 1}/{steps}")))
        progress = int(p.get("x-migd-progress-timeout", 0))
        g = self.guest
        if progress and g.low is not None and now - g.low_time >= progress and remaining > self.threshold():
            g.low_time = now  # one act per timeout
            if p.get("x-migd-progress-action", "abort") == "abort":
                acts.append(self._record(now, Action("abort", 0, f"Migration made no progress for "
                                                     f"{progress} s (x-migd-progress-timeout)")))
                self._aborted = True
                return acts
            acts.extend(self._escalate(now, remaining, p))
        if p.get("x-migd-auto-throttle", False):
            act = self._computed_throttle(now, p)
            if act is not None:
                acts.append(act)
        return acts

    def _escalate(self, now: float, remaining: int, p: Mapping[str, Any]) -> list[Action]:
        """No progress: raise the throttle to what the dirty rate needs, and the downtime limit to
        what the working set needs (at most x-migd-downtime-max, default 2 × the limit)."""
        acts: list[Action] = []
        act = self._computed_throttle(now, p, force=True)
        if act is not None:
            acts.append(act)
        cap = int(p.get("x-migd-downtime-max", 0)) or 2 * int(p["downtime-limit"])
        rate = self.final_rate()
        need = self.fixed_ms() + (min(remaining, self.guest.working_set or remaining) / rate * 1000
                                  if rate > 0 else 0)
        value = int(min(cap, max(need, 2 * self.limit_ms())))
        if value > self.limit_ms():
            self.limit_override = value
            acts.append(self._record(now, Action("downtime-limit", value, "no progress: downtime raised")))
        return acts

    def needed_throttle(self, p: Mapping[str, Any]) -> int:
        """The throttle % that brings the guest's (unthrottled) dirty rate to THROTTLE_TARGET of the
        throughput the link gives, capped at max-cpu-throttle."""
        g = self.guest
        # the pace of rounds of data pages (what the guest's writes compete with), else any window's
        tp = self.data_throughput if self.data_throughput.samples else self.throughput
        send = tp.value if tp.samples else 0.0
        if g.raw_rate.samples:
            raw = g.raw_rate.value
        elif g.fit is not None:  # the first pass: the dirty log's fit
            raw = g.fit[0] / max(0.01, 1 - self.throttle / 100)
        else:
            return self.throttle
        if send <= 0:
            return self.throttle
        if raw <= THROTTLE_TARGET * send:
            return 0
        need = round((1 - THROTTLE_TARGET * send / raw) * 100)
        return max(0, min(int(p.get("max-cpu-throttle", 99)), need))

    def _computed_throttle(self, now: float, p: Mapping[str, Any], force: bool = False) -> Action | None:
        """Only ever raised while the migration runs (the thread removes it at the end); only when the
        forecast is not converging, unless ``force``."""
        if not force and self.state in (None, Convergence.CONVERGING):  # None: not judged yet
            return None
        need = self.needed_throttle(p)
        if need <= self.throttle:
            return None
        self.throttle, self._throttle_since = need, now
        return self._record(now, Action("throttle", need, "computed from the dirty rate and the link"))

    def _record(self, now: float, act: Action) -> Action:
        self.actions.append(act.as_dict(int((now - self.start) * 1000)))
        return act
