"""SwitchoverPolicy replayed on synthetic traces: no threads, no sockets, simulated time.

A small simulator plays the migration thread: 100 ms windows, a link of known capacity with a rate
cap, the thread's own cost per byte, a guest dirtying pages of a working set at a given rate, bitmap
syncs when the policy asks for them, and a switch-over whose real cost is the true fixed costs plus
the final pass at the uncapped rate. The policy sees only what the thread would measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from migd.migration.params import DEFAULT_PARAMETERS
from migd.migration.policy import (
    DEST_PRIOR_RUN_S,
    DRAIN_BUDGET_S,
    DRAIN_MS,
    HOLD_S,
    PRIOR_RUN_S,
    RESEND_WAIT_S,
    Step,
    SwitchoverPolicy,
    _fit_run_cost,
    _least_squares,
    dirtied_by,
    fit_dirty_log,
    nova_schedule,
    run_share,
)

MIB = 1 << 20
WINDOW = 0.1


@dataclass
class Sim:
    ram: int = 512 * MIB
    link: float = 2000 * MIB  # bytes/s inside writes
    cpu_per_byte: float = 1 / (600 * MIB)  # the thread's own work per byte
    cap: float = 0.0  # max-bandwidth, bytes/s (0 = unlimited)
    dirty_rate: float = 0.0  # bytes/s the guest writes
    wss: int = 0  # bytes of the writable working set (0 = all RAM)
    rtt: float = 0.0002  # s
    stop_ms: float = 0.5
    device_ms: float = 0.2
    sync_ms: float = 1.5
    other_ms: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    data_ram: bool = False  # every page holds data (no cheap zero pages in the first pass)
    throttle: int = 0  # % the policy's computed throttle set (the guest's writes slow down by it)
    # state
    t: float = 0.0
    bitmap: float = 0.0  # bytes known dirty, to send
    unsynced: float = 0.0  # bytes dirtied since the last sync, not yet in the bitmap
    logged: float = 0.0  # bytes the dirty log holds: distinct pages dirtied since the last sync
    first_pass: float = 0.0  # bytes of the first pass still to send (zero pages: cheap on the wire)
    sent: float = 0.0
    log: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.p = {**DEFAULT_PARAMETERS, "max-bandwidth": int(self.cap), **self.params}
        self.policy = SwitchoverPolicy(lambda: self.p, self.ram, 0.0)
        self.policy.on_phase("device-state", self.device_ms)  # the dry run at setup
        self.policy.on_phase("wake", self.stop_ms / 2)
        if self.data_ram:
            self.bitmap = float(self.ram)
        else:
            self.first_pass = float(self.ram)
        self._sync()

    @property
    def set_size(self) -> float:
        return float(self.wss or self.ram)

    def _final_rate(self) -> float:
        return 1 / (1 / self.link + self.cpu_per_byte)

    def real_downtime_ms(self, remaining: float) -> float:
        return (self.stop_ms + self.sync_ms + self.device_ms + self.other_ms + self.rtt * 1000
                + remaining / self._final_rate() * 1000)

    def _sync(self) -> None:
        new = self.unsynced
        self.bitmap = min(self.set_size, self.bitmap + new)
        self.unsynced = 0.0
        self.policy.on_phase("sync", self.sync_ms)
        self.policy.on_sync(self.t, int(self.remaining), int(new), int(self.logged))
        self.logged = 0.0

    @property
    def remaining(self) -> float:
        return self.first_pass + self.bitmap

    def _window(self) -> None:
        rate = self._final_rate()
        budget = rate * WINDOW if not self.cap else min(rate, self.cap) * WINDOW
        # zero pages of the first pass cost the thread its page scan but almost no wire bytes
        wire = 0.0
        work_s = 0.0
        ram_bytes = 0.0
        if self.first_pass:
            zero = min(self.first_pass, budget * 8)
            self.first_pass -= zero
            wire += zero / 400
            work_s += zero / (8 * rate)
            ram_bytes += zero
        left = max(0.0, budget - work_s * rate)
        data = min(self.bitmap, left)
        self.bitmap -= data
        wire += data
        ram_bytes += data
        work_s += data / rate
        busy = wire / self.link
        # a thread with nothing left to send does not sit out the window: it syncs and goes on
        spent = WINDOW
        if not self.first_pass and not self.bitmap:
            spent = min(WINDOW, max(work_s, wire / self.cap if self.cap else 0.0, 0.01))
        # the guest: new dirty bytes outside what is already pending
        fresh = 1 - min(1.0, (self.bitmap + self.first_pass + self.unsynced) / self.set_size)
        written = self.dirty_rate * (1 - self.throttle / 100) * spent
        self.unsynced += written * fresh
        self.logged += written * (1 - min(1.0, self.logged / self.set_size))
        self.t += spent
        self.sent += wire
        self.policy.on_window(self.t, int(wire), busy, min(spent, work_s), spent, int(ram_bytes))
        self.policy.on_dirty_log(self.t, int(self.logged))
        self.policy.on_rtt(self.rtt)

    def run(self, limit_s: float = 60.0) -> dict[str, Any]:
        """Until the switch-over, an abort or ``limit_s``; returns what happened."""
        actions: list[Any] = []
        while self.t < limit_s:
            exact = False
            for _ in range(3):  # a SYNC asks again with an exact pending
                d = self.policy.decide(self.t, int(self.remaining), exact)
                actions.extend(d.actions)
                for a in d.actions:
                    if a.action == "throttle":
                        self.throttle = a.value
                if any(a.action == "abort" for a in d.actions):
                    return {"aborted": True, "t": self.t, "actions": actions}
                if d.step is not Step.SYNC:
                    break
                self._sync()
                exact = True
            if d.step is Step.SWITCHOVER:
                final = self.remaining + self.unsynced
                expected = self.policy.expected_downtime_ms(int(self.remaining))
                return {"aborted": False, "t": self.t, "expected": expected, "actions": actions,
                        "real": self.real_downtime_ms(final), "final": final}
            self._window()
            forecast = self.policy.forecast(self.t, int(self.remaining))
            self.log.append((self.t, self.policy.expected_downtime_ms(int(self.remaining)), forecast))
        return {"aborted": False, "t": self.t, "expected": None, "actions": actions}


def within(expected: float, real: float) -> bool:
    """Issue 10's bound at the switch-over: ±25 %, or ±5 ms below 20 ms."""
    return abs(expected - real) <= (5 if real < 20 else 0.25 * real)


def test_idle_guest_switches_over_after_the_first_pass_at_the_fixed_cost() -> None:
    sim = Sim()
    r = sim.run()
    assert r["expected"] is not None and r["t"] < 2
    assert r["final"] == 0 and within(r["expected"], r["real"])


def test_64m_dirty_unlimited_converges_and_the_estimate_holds() -> None:
    sim = Sim(dirty_rate=64 * MIB)
    r = sim.run()
    assert r["expected"] is not None and r["t"] < 5, r
    assert within(r["expected"], r["real"]), r
    assert r["real"] <= 300


@pytest.mark.parametrize("cap", [128 * MIB, 32 * MIB])
def test_capped_link_switches_over_at_the_uncapped_final_rate(cap: float) -> None:
    """The final pass runs uncapped: the threshold must not be computed at the cap (issue 10: 84 s)."""
    sim = Sim(cap=cap, dirty_rate=cap)  # the guest dirties as fast as the cap lets pages out
    r = sim.run()
    assert r["expected"] is not None and r["t"] <= 25, r  # first pass of 512 MiB at the cap, then done
    assert within(r["expected"], r["real"]), r
    assert r["real"] <= 300
    # the link's capacity was seen through the cap, and kept apart from the capped throughput
    assert sim.policy.capacity.value == pytest.approx(sim.link, rel=0.01)
    assert sim.policy.final_rate() > 3 * cap


def test_32m_at_32mib_s_with_a_small_guest_is_done_in_seconds() -> None:
    sim = Sim(ram=128 * MIB, cap=32 * MIB, dirty_rate=32 * MIB)
    r = sim.run()
    assert r["expected"] is not None and r["t"] <= 5, r


def test_estimates_after_the_first_second_stay_within_twice_the_real_downtime() -> None:
    sim = Sim(cap=128 * MIB, dirty_rate=64 * MIB, wss=64 * MIB)
    r = sim.run()
    assert r["expected"] is not None
    late = [e for t, e, _ in sim.log if t >= 1.0 and sim.first_pass == 0]
    for e in late[-3:]:
        assert e <= 2 * sim.real_downtime_ms(sim.set_size) + 1


def error_factor(expected: float, real: float) -> float:
    """How far off an estimate is, as a factor; within 5 ms counts as exact (issue 10's bound)."""
    return 1.0 if abs(expected - real) <= 5 else max(expected / real, real / expected)


@pytest.mark.parametrize("case", [
    {"cap": 128 * MIB, "dirty_rate": 64 * MIB, "data_ram": True},  # a first pass of 4 s
    {"cap": 32 * MIB, "dirty_rate": 16 * MIB, "data_ram": True, "params": {"downtime-limit": 50}},  # of 16 s
    {"dirty_rate": 64 * MIB, "data_ram": True},
    # QEMU's hardest anchor case with the computed throttle: the forecast counts on the throttle
    {"cap": 100 * MIB, "dirty_rate": 500 * MIB, "data_ram": True, "params": {"x-migd-auto-throttle": True}},
], ids=["128M-64M", "32M-16M-limit50", "unlimited-64M", "anchor-auto-throttle"])
def test_expected_downtime_after_the_first_second_forecasts_the_switchover(case: dict[str, Any]) -> None:
    """Not the cost of switching over now (all of a long first pass at the final rate): the
    downtime of the switch-over the policy will make, within x2 from the first second on."""
    sim = Sim(**case)
    r = sim.run(limit_s=60)
    assert r["expected"] is not None, r
    assert within(r["expected"], r["real"]), r
    late = [(round(t, 2), e) for t, e, _ in sim.log if t >= 1.0]
    assert late
    worst = max(late, key=lambda te: error_factor(te[1], r["real"]))
    assert error_factor(worst[1], r["real"]) <= 2, (worst, r["real"])


def test_the_dirty_log_fit_finds_the_rate_and_the_working_set() -> None:
    rate, wss = 100 * MIB, 64 * MIB  # uniform writes over a hot set
    peeks = [(0.1 * i, int(dirtied_by((rate, wss), 0.1 * i))) for i in range(1, 11)]
    fit = fit_dirty_log(peeks, 512 * MIB)
    assert fit is not None
    assert fit[0] == pytest.approx(rate, rel=0.02) and fit[1] == pytest.approx(wss, rel=0.02)
    linear = [(0.1 * i, int(16 * MIB * 0.1 * i)) for i in range(1, 11)]  # far from any bound
    assert fit_dirty_log(linear, 512 * MIB) == pytest.approx((16 * MIB, 512 * MIB), rel=0.02)
    assert fit_dirty_log([(0.1 * i, 0) for i in range(1, 5)], 512 * MIB) == (0.0, 0.0)  # idle
    assert fit_dirty_log([(0.1, 4096)], 512 * MIB) is None  # too short to say


def test_a_guest_at_the_edge_of_halving_gets_one_plan() -> None:
    """Rounds that shrink by about HALVING: the verdict on another round holds while the measured
    ratio wanders within the band, so the plan published a second in is the one carried out."""
    p = {**DEFAULT_PARAMETERS}
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 0)
    t = 0.0
    for _ in range(20):  # 100 MiB/s of data pages through a 100 MiB/s cap
        t += WINDOW
        policy.on_window(t, 10 * MIB, 0.005, 0.01, WINDOW, 10 * MIB)
    for dirtied in (62, 62, 62):  # two syncs past the first pass: 62 MiB/s
        t += 1.0
        policy.on_sync(t, 40 * MIB, dirtied * MIB)
    remaining = 30 * MIB
    assert remaining <= policy.threshold()
    assert policy.decide(t, remaining, True).step is Step.ITERATE  # 0.62 x: just above 0.6, but first
    verdicts = []
    for dirtied in (66, 58, 67, 60, 65):  # 0.58 .. 0.67: within the band, the verdict holds
        t += 1.0
        policy.on_sync(t, remaining, dirtied * MIB)
        verdicts.append(policy.decide(t, remaining, True).step)
    assert verdicts == [Step.ITERATE] * 5 or verdicts == [Step.SWITCHOVER] * 5, verdicts


def test_hardest_anchor_case_converges_with_the_computed_throttle() -> None:
    """QEMU never converges with a guest dirtying 512 MiB at 500 MiB/s over 100 MiB/s (~100 s with
    auto-converge): one computed throttle step, done within 30 s, at the estimated downtime."""
    sim = Sim(cap=100 * MIB, dirty_rate=500 * MIB, data_ram=True, params={"x-migd-auto-throttle": True})
    r = sim.run(limit_s=60)
    assert r["expected"] is not None and r["t"] <= 30, r
    throttles = [a.value for a in r["actions"] if a.action == "throttle"]
    assert throttles and len(throttles) <= 2, throttles
    assert within(r["expected"], r["real"]) and r["real"] <= 300, r


def test_convergence_state_does_not_flap_about_the_threshold() -> None:
    """A throttled guest whose remaining hovers about the threshold: between syncs the estimate
    dips below it, the syncs' trend says one thing then the other; X_MIGD_CONVERGENCE must not
    follow every turn (issue 10: the state flapped a few times with the throttle on)."""
    p = {**DEFAULT_PARAMETERS, "downtime-limit": 50}
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 0)
    t = 0.0
    for _ in range(20):
        t += WINDOW
        policy.on_window(t, 10 * MIB, 0.05, 0.06, WINDOW, 10 * MIB)
    threshold = policy.threshold()
    # remaining at each sync, relative to the threshold: falling, rising, falling ... never within
    pattern = (1.5, 1.5, 1.3, 1.5, 1.5, 1.5, 1.2, 1.5, 1.4, 1.5, 1.5, 1.25)
    states = []
    for k in range(30):
        t += 1.0
        at_sync = int(threshold * pattern[k % len(pattern)])
        policy.on_sync(t, at_sync, 30 * MIB)
        states.append(policy.forecast(t, at_sync)["state"])  # published at the sync, as the thread does
        for j in range(1, 10):  # between syncs, the estimate falls as pages go out, below the threshold
            states.append(policy.forecast(t + 0.1 * j, int(threshold * (1 - 0.08 * j)))["state"])
    changes = sum(1 for a, b in zip(states, states[1:], strict=False) if a != b)
    assert changes <= 30 / HOLD_S / 2, (changes, states[::10])
    assert states[-1] == "diverging"  # remaining never came within the threshold at a sync


def test_the_destinations_load_rate_bounds_the_final_pass() -> None:
    """Under a rate limit the writes land in socket buffers (GB/s); a PING sent just after a burst
    also times the destination loading it, and the final pass runs at the slower end."""
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 512 * MIB, 0.0)
    for i in range(5):  # 3.2 MiB bursts written in 0.8 ms: 4 GB/s into the buffer
        policy.on_window(0.1 * (i + 1), 32 * MIB // 10, 0.0008, 0.004, 0.1, 32 * MIB // 10)
    fast = policy.final_rate()
    assert fast > 700 * MIB
    policy.on_rtt(0.002)  # the plain round trip
    policy.on_rtt(0.002 + 32 * MIB / 10 / (350 * MIB), behind_bytes=32 * MIB // 10)
    assert policy.load_rate() == pytest.approx(350 * MIB, rel=0.01)
    assert policy.final_rate() == pytest.approx(350 * MIB, rel=0.01)
    assert policy.rtt_ms() == pytest.approx(2)  # a probe is not a round trip sample


def test_diverging_guest_is_reported_diverging_within_ten_seconds() -> None:
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB, params={"downtime-limit": 50})
    r = sim.run(limit_s=15)
    assert r["expected"] is None  # no switch-over: 128 MiB never fit in 50 ms
    states = [(t, f["state"]) for t, _, f in sim.log]
    first = next(t for t, s in states if s == "diverging")
    assert first <= 10, states[::10]
    assert sim.log[-1][2]["state"] == "diverging"
    assert sim.log[-1][2]["dirty-rate"] > 32 * MIB and sim.log[-1][2]["working-set"] >= 64 * MIB
    assert "eta-ms" not in sim.log[-1][2]


def test_a_plan_that_never_fits_forecasts_a_switchover_within_the_threshold() -> None:
    """A guest faster than its link (the policy off): no switch-over comes above the threshold, so
    the one the estimate forecasts, if it comes, costs at most the limit (x-migd-convergence says
    diverging), never the seconds that 128 MiB would take."""
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB, params={"downtime-limit": 50})
    sim.run(limit_s=6)
    late = [e for t, e, _ in sim.log if t >= 1.0]
    assert late and max(late) <= 50, max(late)
    assert sim.log[-1][2]["state"] == "diverging"


def test_converging_forecast_has_an_eta() -> None:
    sim = Sim(cap=64 * MIB, dirty_rate=8 * MIB)
    sim.run()
    converging = [f for _, _, f in sim.log if f["state"] == "converging" and "eta-ms" in f]
    assert converging and all(f["eta-ms"] >= 0 for f in converging)


def test_50ms_rtt_is_a_fixed_cost_and_never_stalls_the_switchover() -> None:
    """The old catch-up waited one RTT per attempt and restarted its window: nothing completed."""
    sim = Sim(ram=128 * MIB, data_ram=True, dirty_rate=4 * MIB, rtt=0.1, params={"downtime-limit": 300})
    r = sim.run()
    assert r["expected"] is not None and r["t"] < 5, r
    assert r["expected"] >= 100  # the round trip is in the estimate
    assert within(r["expected"], r["real"]), r


def test_avail_switchover_bandwidth_replaces_the_measured_rate() -> None:
    sim = Sim(params={"avail-switchover-bandwidth": 100 * MIB})
    policy = sim.policy
    fixed = policy.fixed_ms()
    assert policy.final_rate() == 100 * MIB
    assert policy.expected_downtime_ms(10 * MIB) == round(fixed + 100)
    assert policy.threshold() == int((300 - fixed) / 1000 * 100 * MIB)


def test_a_pong_behind_a_backlog_is_no_round_trip_sample() -> None:
    """A PING queued behind 2.5 MB the destination had not read came back after 82 ms, while the
    switch-over's LOADED took 8.8 ms: its lateness is the backlog's (counted by on_backlog)."""
    sim = Sim(rtt=0.0005)
    before = sim.policy.rtt_ms()
    sim.policy.on_rtt(0.082, queued_bytes=2_500_000)
    assert sim.policy.rtt_ms() == pytest.approx(before)
    sim.policy.on_rtt(0.004, queued_bytes=768)  # a PING with nothing ahead of it is one
    assert sim.policy.rtt_ms() > before


@pytest.mark.parametrize("cap", [0.0, 128 * MIB])
def test_the_socket_backlog_counts_when_uncapped(cap: float) -> None:
    """Uncapped, a destination that could not drain the socket first (``drain_gave_up``) loads the
    final pass after what it still holds, at the pace it frees the socket (the link capacity); under
    a rate limit it catches up while the thread sleeps."""
    sim = Sim(cap=cap)
    for _ in range(5):
        sim._window()
    policy = sim.policy
    policy.drain_gave_up = True
    before = policy.expected_downtime_ms(0)
    policy.on_backlog(8 * MIB)
    after = policy.expected_downtime_ms(0)
    if cap:
        assert after == before
    else:
        assert after == pytest.approx(before + 8 * MIB / policy.capacity.value * 1000, abs=1)
        assert after > before


def backlogged_at_switchover() -> Sim:
    """An idle guest uncapped with its pages sent, at the point of switching over, and 8 MiB in the
    socket: 4 ms of loading at the link capacity."""
    sim = Sim()
    for _ in range(5):
        sim._window()
    sim._sync()
    sim.policy.on_backlog(8 * MIB)
    return sim


def test_a_backlog_is_drained_before_the_switchover() -> None:
    """The destination loads the socket's backlog while the guest runs, not inside the downtime: the
    decision is DRAIN until it fits in DRAIN_MS, and the estimate counts no more than that."""
    sim = backlogged_at_switchover()
    policy = sim.policy
    assert policy.full_backlog_ms() > DRAIN_MS
    assert policy.backlog_ms() == DRAIN_MS
    assert policy.decide(sim.t, 0, True).step is Step.DRAIN
    assert policy.drain_target() < 8 * MIB
    with_backlog = policy.expected_downtime_ms(0)
    policy.on_backlog(policy.drain_target())  # the thread waited: the destination read it
    assert policy.decide(sim.t + 0.01, 0, True).step is Step.SWITCHOVER
    assert policy.expected_downtime_ms(0) <= with_backlog


def test_a_backlog_that_does_not_drain_counts_in_after_the_budget() -> None:
    """A destination that reads nothing for DRAIN_BUDGET_S: the switch-over stops waiting for it,
    decides again with the whole backlog counted in, and then goes ahead (it still fits)."""
    sim = backlogged_at_switchover()
    policy = sim.policy
    t = sim.t
    while policy.decide(t, 0, True).step is Step.DRAIN:
        t += 0.1
        assert t - sim.t <= DRAIN_BUDGET_S + 0.2
    assert policy.drain_gave_up and t - sim.t > DRAIN_BUDGET_S
    assert policy.backlog_ms() == policy.full_backlog_ms() > DRAIN_MS
    assert policy.decide(t + 0.1, 0, True).step is Step.SWITCHOVER


def test_no_drain_when_the_guest_would_dirty_past_the_threshold_meanwhile() -> None:
    """A guest at the edge of converging: while the destination loads the backlog it dirties more
    than the threshold leaves room for, so the switch-over goes ahead with the backlog counted in
    (it fits) rather than drain and find too much to send after it."""
    sim = Sim(dirty_rate=1000 * MIB, wss=256 * MIB, data_ram=True)
    for _ in range(30):
        sim._window()
        sim._sync()
    policy = sim.policy
    policy.on_backlog(64 * MIB)  # 32 ms of loading at the link's 2 GB/s: ~30 MB dirtied meanwhile
    full = policy.threshold(drained=False)
    assert 0 < full < policy.threshold(drained=True)
    remaining = full - MIB  # fits with the backlog, and would with a drain, but not after one
    assert not policy._drain_would_pay(remaining)
    assert policy.decide(sim.t, remaining, True).step is Step.SWITCHOVER
    assert policy.backlog_ms() == policy.full_backlog_ms()  # the estimate counts it all
    assert policy.decide(sim.t, full + (full - remaining), True).step is Step.ITERATE


def test_a_backlog_longer_than_the_limit_is_drained_even_when_the_guest_dirties_meanwhile() -> None:
    """Nothing left to send, but the backlog alone takes longer to load than the downtime limit: an
    empty threshold is no fit, so the switch-over drains (the guest's pages are a later round's)."""
    sim = Sim(dirty_rate=1000 * MIB, wss=256 * MIB, data_ram=True, params={"downtime-limit": 50})
    for _ in range(30):
        sim._window()
        sim._sync()
    policy = sim.policy
    policy.on_backlog(256 * MIB)  # ~130 ms at the link's 2 GB/s
    assert policy.full_backlog_ms() > 50 and policy.threshold(drained=False) == 0
    assert not policy._drain_would_pay(0)
    assert policy.decide(sim.t, 0, True).step is Step.DRAIN


def test_a_new_round_may_drain_again() -> None:
    """Draining is per switch-over: once remaining rose above the threshold, the budget starts anew."""
    sim = backlogged_at_switchover()
    policy = sim.policy
    assert policy.decide(sim.t, 0, True).step is Step.DRAIN
    assert policy.decide(sim.t + 0.9, 400 * MIB, True).step is not Step.DRAIN  # a new round
    assert policy.decide(sim.t + 1.5, 0, True).step is Step.DRAIN  # 1.5 s after the first drain


def test_a_probe_the_destination_kept_up_with_bounds_nothing() -> None:
    """A probe's PONG that came soon after its burst was written timed the source (its vCPUs
    running), not the destination: it ends the first switch-over's wait, but caps no rate."""
    p = {**DEFAULT_PARAMETERS, "max-bandwidth": 32 * MIB}
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0, peer_answers=True)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)  # past the first pass
    policy.on_rtt(0.0002)
    policy.on_window(1.1, 3_400_000, 0.001, 0.004, 0.1, 3_400_000)
    rate = policy.final_rate()
    policy.on_rtt(0.040, behind_bytes=3_400_000, burst_s=0.035)  # answered 5 ms after the burst
    assert policy.load_rate() == 0.0 and policy.final_rate() == rate
    assert not policy._wait_for_probe(1.2, 40 * MIB)
    policy.on_rtt(0.080, behind_bytes=3_400_000, burst_s=0.020)  # 60 ms after: the destination's pace
    assert policy.load_rate() == pytest.approx(3_400_000 / (0.080 - 0.0002))


def test_one_descheduled_window_does_not_set_the_cost_per_byte() -> None:
    """The work per byte of re-sends is the median of the last windows (measured: 2.5 ns/B as an
    average, 1.0 as the median of the same windows)."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)
    sent = 3_400_000
    for i, ns in enumerate((1.0, 1.1, 30.0, 0.9, 1.0)):
        policy.on_window(1.1 + i / 10, sent, 0.001, 0.001 + sent * ns * 1e-9, 0.1, sent)
    assert policy.final_rate() == pytest.approx(1 / (1 / policy.capacity.value + 1.0e-9), rel=0.01)


def test_first_sends_do_not_set_the_cost_of_re_sends() -> None:
    """The final pass re-sends pages: once a round past the first pass was measured, the first
    pass's (dearer) data windows no longer count; during the first pass its cheapest one does."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    for i, ns in enumerate((40, 8, 20)):  # first sends: 3.4 MB windows at 40, 8, 20 ns/B of work
        sent = 3_400_000
        policy.on_window(0.1 * (i + 1), sent, 0.001, 0.001 + sent * ns * 1e-9, 0.1, sent)
    first = policy.final_rate()
    assert first == pytest.approx(1 / (1 / policy.capacity.value + 8e-9), rel=0.01)
    policy.on_sync(0.5, 60 * MIB, 60 * MIB, 60 * MIB)  # the first pass ends
    policy.on_window(0.6, 3_400_000, 0.001, 0.001 + 3_400_000 * 1e-9, 0.1, 3_400_000)
    assert policy.final_rate() > 3 * first


def test_measured_stop_replaces_the_wake_latency_prior() -> None:
    sim = Sim()
    before = sim.policy.fixed_ms()
    sim.policy.on_phase("stop-vcpus", 7.0)
    assert sim.policy.fixed_ms() == pytest.approx(before - sim.stop_ms + 7.0)


def test_nothing_known_yet_keeps_qemus_first_guess_unless_nothing_is_pending() -> None:
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 64 * MIB, 0.0)
    assert policy.expected_downtime_ms(10 * MIB) == 300
    assert policy.expected_downtime_ms(10 * MIB, fallback_rate=100 * MIB) == round(policy.fixed_ms() + 100)
    assert policy.expected_downtime_ms(0) == round(policy.fixed_ms())
    assert policy.decide(0.0, 10 * MIB, False).step is Step.ITERATE  # threshold 0 before any window
    assert policy.decide(0.0, 0, False).step is Step.SYNC
    assert policy.decide(0.0, 0, True).step is Step.SWITCHOVER


# -- the built-in convergence policy ------------------------------------------------------------

def test_builtin_policy_is_off_by_default() -> None:
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB, params={"downtime-limit": 50})
    r = sim.run(limit_s=20)
    assert r["actions"] == [] and sim.policy.actions == []


def test_progress_timeout_aborts_with_a_reason() -> None:
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB,
              params={"downtime-limit": 50, "x-migd-progress-timeout": 5})
    r = sim.run(limit_s=60)
    assert r["aborted"] and r["t"] < 30, r
    (act,) = r["actions"]
    assert act.action == "abort" and "no progress for 5 s" in act.reason
    assert sim.policy.actions[0]["action"] == "abort"


def test_progress_timeout_escalates_until_it_converges() -> None:
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB,
              params={"downtime-limit": 50, "x-migd-progress-timeout": 3, "x-migd-progress-action": "escalate",
                      "x-migd-downtime-max": 1000})
    r = sim.run(limit_s=120)
    assert r["expected"] is not None, sim.policy.actions
    kinds = {a.action for a in r["actions"]}
    assert "downtime-limit" in kinds
    assert r["real"] <= sim.policy.limit_ms()


def test_completion_timeout_per_gib() -> None:
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB,
              params={"downtime-limit": 50, "x-migd-completion-timeout": 20})  # 20 s/GiB: 10 s here
    r = sim.run(limit_s=60)
    assert r["aborted"] and 10 <= r["t"] <= 10.5, r


def test_nova_schedule_grows_to_the_maximum() -> None:
    schedule = nova_schedule(50, 500, 10, 75 * 0.5)
    assert len(schedule) == 11 and schedule[0][0] == 0 and schedule[-1] == (375.0, 500)
    values = [v for _, v in schedule]
    assert values == sorted(values) and values[0] >= 50


def test_downtime_steps_raise_the_limit_on_schedule() -> None:
    sim = Sim(cap=32 * MIB, dirty_rate=100 * MIB, wss=128 * MIB,
              params={"downtime-limit": 50, "x-migd-downtime-steps": 5, "x-migd-downtime-step-delay": 4,
                      "x-migd-downtime-max": 2000})
    r = sim.run(limit_s=60)
    steps = [a for a in r["actions"] if a.action == "downtime-limit"]
    assert steps and [a.value for a in steps] == sorted(a.value for a in steps)
    assert r["expected"] is not None and r["real"] <= sim.policy.limit_ms() * 1.25


def test_computed_throttle_is_what_the_dirty_rate_needs() -> None:
    p = {**DEFAULT_PARAMETERS, "downtime-limit": 50, "x-migd-auto-throttle": True}
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    t = 0.0
    policy.on_sync(t, 512 * MIB, 0)
    for i in range(40):  # 32 MiB/s of data pages, a sync every second finding 100 MiB newly dirty
        t += WINDOW
        policy.on_window(t, 32 * MIB // 10, 0.002, 0.02, WINDOW, 32 * MIB // 10)
        if i % 10 == 9:
            policy.on_sync(t, 128 * MIB, 100 * MIB)
    d = policy.decide(t, 128 * MIB, True)
    # 100 MiB/s against 32 MiB/s: a dirty rate of 40 % of it (12.8 MiB/s) needs a throttle of 87 %
    (act,) = d.actions
    assert act.action == "throttle" and act.value == 87 and policy.throttle == 87
    assert policy.actions == [act.as_dict(int(t * 1000))]
    # measured under its own throttle, the guest dirties 12.8 MiB/s: no further step
    for _ in range(3):
        t += 1.0
        policy.on_sync(t, 128 * MIB, int(12.8 * MIB))
    assert policy.decide(t, 128 * MIB, True).actions == ()
    p["max-cpu-throttle"] = 50
    assert policy.needed_throttle(p) == 50  # capped


# -- the parameters -------------------------------------------------------------------------------

def test_policy_parameters_are_off_by_default_and_checked() -> None:
    from migd.migration.params import MigrationConfig, ParamError

    cfg = MigrationConfig()
    p = cfg.query_parameters()
    assert p["x-migd-progress-timeout"] == p["x-migd-downtime-steps"] == p["x-migd-completion-timeout"] == 0
    assert p["x-migd-auto-throttle"] is False and p["x-migd-progress-action"] == "abort"
    with pytest.raises(ParamError, match="^Parameter 'x-migd-progress-action' does not accept value 'retry'$"):
        cfg.set_parameters({"x-migd-progress-action": "retry"})
    with pytest.raises(ParamError, match="^Parameter 'x-migd-downtime-steps' expects uint8$"):
        cfg.set_parameters({"x-migd-downtime-steps": 300})
    with pytest.raises(ParamError, match="x-migd-downtime-max"):
        cfg.set_parameters({"x-migd-downtime-max": 3_000_000})
    assert cfg.query_parameters() == p  # a refused change changes nothing
    cfg.set_parameters({"x-migd-progress-timeout": 150, "x-migd-progress-action": "escalate"})
    assert cfg.param("x-migd-progress-timeout") == 150


def test_stalled_when_nothing_moves_and_diverging_when_the_trend_never_fits() -> None:
    p = {**DEFAULT_PARAMETERS, "downtime-limit": 50}
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 0)
    t = 0.0
    for i in range(30):  # 32 MiB/s of data pages; remaining approaches 100 MiB and stays there
        t += WINDOW
        policy.on_window(t, 32 * MIB // 10, 0.002, 0.01, WINDOW, 32 * MIB // 10)
        if i % 10 == 9:
            policy.on_sync(t, int(100 * MIB + 40 * MIB / (i + 1)), 30 * MIB)
    for _ in range(3):
        t += 1.0
        policy.on_window(t, 32 * MIB // 10, 0.002, 0.01, WINDOW, 32 * MIB // 10)
        policy.on_sync(t, int(100 * MIB + 40 * MIB / (t * 10)), 30 * MIB)
    assert policy.forecast(t, 100 * MIB)["state"] == "diverging"
    assert policy.asymptote() is not None and policy.asymptote() > policy.threshold()
    # a destination that stopped reading: nothing goes out at all
    stuck = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    for i in range(4):
        stuck.on_sync(float(i), 200 * MIB, 0)
        stuck.on_sync(float(i) + 0.95, 200 * MIB, 0)
    assert stuck.forecast(4.0, 200 * MIB)["state"] == "stalled"


def test_an_unanswered_ping_is_a_lower_bound_of_the_round_trip() -> None:
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 64 * MIB, 0.0)
    policy.on_rtt(0.04, lower_bound=True)  # the first PING, out for 40 ms and counting
    assert policy.rtt_ms() == pytest.approx(40)
    policy.on_rtt(0.002)
    policy.on_rtt(0.04, lower_bound=True)  # once a PONG came: a PING out for 40 ms is a hiccup
    assert policy.rtt_ms() == pytest.approx(2)
    policy.on_rtt(0.6, lower_bound=True)  # ... out for 600 ms is not
    assert policy.rtt_ms() == pytest.approx(600)
    policy.on_rtt(0.1)  # answered after 100 ms
    assert policy.rtt_ms() == pytest.approx(2)  # the least of the last five: 100 ms was queueing
    for _ in range(5):  # the link itself got slower: once the last five say so
        policy.on_rtt(0.05)
    assert policy.rtt_ms() == pytest.approx(50)


def test_with_a_return_path_the_first_switchover_waits_for_one_answered_ping() -> None:
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 64 * MIB, 0.0, peer_answers=True)
    assert policy.decide(0.0, 0, True).step is Step.ITERATE and policy.waiting_for_peer
    policy.on_rtt(0.02, lower_bound=True)  # still unanswered: no switch-over yet, a higher estimate
    assert policy.decide(0.02, 0, True).step is Step.ITERATE
    assert policy.expected_downtime_ms(0) >= 20
    policy.on_rtt(0.1)
    assert policy.decide(0.1, 0, True).step is Step.DRAIN and not policy.waiting_for_peer  # a quiet trip
    policy.on_rtt(0.001, drained=True)
    assert policy.decide(0.11, 0, True).step is Step.SWITCHOVER
    silent = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 64 * MIB, 0.0, peer_answers=True)
    silent.peer_silent()  # a peer that never answers PING still gets its switch-over
    assert silent.decide(0.0, 0, True).step is Step.SWITCHOVER


def test_a_first_pass_of_zero_pages_does_not_make_the_final_pass_look_free() -> None:
    """Zero pages cost a scan and 9 wire bytes each; until data pages were seen, that cost per wire
    byte stands (issue found end to end: 4.3 GB/s predicted, 230 MB sent in 790 ms of downtime)."""
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 512 * MIB, 0.0)
    for i in range(5):  # 100 ms windows: 60 MiB of RAM covered, 1.5 MB on the wire, 1 ms in writes
        policy.on_window(0.1 * (i + 1), 1_500_000, 0.001, 0.1, 0.1, 60 * MIB)
    assert policy.capacity.value == pytest.approx(1.5e9)
    assert policy.final_rate() < 20e6  # 1.5 MB per 100 ms of work, not the link's 1.5 GB/s
    policy.on_window(0.7, 30 * MIB, 0.02, 0.1, 0.1, 30 * MIB)  # a window of data pages
    assert 100 * MIB < policy.final_rate() < 1.5e9


def test_a_round_trip_measured_after_a_drain_stands_for_the_others() -> None:
    """PINGs answered by a busy destination took 7-10 ms, LOADED and SHUT 1-1.5 once it had
    loaded everything: the round trip of a PING sent as a DRAIN ended, into an empty socket, is
    the one the switch-over finds, and the estimate counts it instead of the quartile."""
    sim = Sim(rtt=0.008)
    for _ in range(5):
        sim._window()
    policy = sim.policy
    assert policy.rtt_ms() == pytest.approx(8.0)
    policy.on_rtt(0.001, drained=True)
    assert policy.rtt_ms() == pytest.approx(1.0)
    policy.on_rtt(0.009)  # a later busy one does not replace it
    assert policy.rtt_ms() == pytest.approx(1.0)
    policy.on_rtt(0.002, drained=True)  # a later drained one does
    assert policy.rtt_ms() == pytest.approx(2.0)


def test_the_cost_per_byte_is_the_page_work_not_the_whole_window() -> None:
    """A window's work outside its page sends (bitmap syncs, decisions, PINGs) is no part of a final
    pass: with the page work given, the cost per byte is learnt from it (200M on a 64 MiB hot set
    over 32 MiB/s: 1.45 ns/B from the window, 0.41 in the final pass)."""
    p = dict(DEFAULT_PARAMETERS)
    policies = []
    for save_s in (None, 0.0032):
        policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
        policy.on_sync(0.0, 512 * MIB, 512 * MIB)
        policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)
        policy.on_window(1.1, 3_360_000, 0.0012, 0.0064, 0.1, 3_360_000, 0.0054, save_s)
        policies.append(policy)
    whole, pages = (1 / (1 / pol.final_rate() - 1 / pol.capacity.value) for pol in policies)
    assert 1 / whole == pytest.approx((0.0064 - 0.0012) / 3_360_000)
    assert 1 / pages == pytest.approx((0.0032 - 0.0012) / 3_360_000)


def test_bytes_sent_as_page_references_cost_no_write_at_the_source() -> None:
    """A final pass whose runs leave as page references (a unix socket) pays the thread's work per
    byte, not the copying writes the capped rounds measured; the destination's pace still bounds it."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)
    policy.on_window(1.1, 3_000_000, 0.001, 0.0022, 0.1, 3_000_000)  # 3 GB/s writes, 0.4 ns/B of work
    copied = policy.final_rate()
    assert copied == pytest.approx(1 / (1 / 3e9 + 0.4e-9), rel=0.01)
    policy.on_layout(40 * MIB, 100, 0.75)  # 3/4 of what is left in runs of 16 pages or more
    assert policy.final_rate() == pytest.approx(1 / (0.25 / 3e9 + 0.4e-9), rel=0.01)
    policy.on_layout(40 * MIB, 100, 1.0)
    assert policy.final_rate() == pytest.approx(1 / 0.4e-9, rel=0.01)
    for i in range(3):  # the destination loads 1.3 GB/s on a CPU of its own
        policy.on_load_pace(1.2 + i / 10, (i + 1) * 13_000_000, (i + 1) * 3174, 0.01 * (i + 1), 0.0,
                            0.01 * (i + 1))
    assert policy.final_rate() == pytest.approx(1.3e9, rel=0.01)


def test_until_a_re_send_span_is_reported_the_first_sends_pace_bounds_the_final_pass() -> None:
    """Past the first pass, before the destination reported a span of re-sent data pages (a capped
    switch-over can come two windows after it), its first pass's spans of data pages bound the final
    pass, not the least-squares fit of mixed spans (which said 883 MB/s for a final pass at 1.8 GB/s)."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    total_b = total_p = 0
    busy = 0.0
    for i, (data, zeros, cpu) in enumerate(((3 * MIB, 20_000, 0.003), (3 * MIB, 0, 0.0021),
                                            (3 * MIB, 0, 0.002), (3 * MIB, 0, 0.0023))):
        total_b, total_p, busy = total_b + data, total_p + data // 4096 + zeros, busy + cpu
        policy.on_load_pace(0.1 * i, total_b, total_p, busy, 0.0, busy)
    first = sorted(3 * MIB / c for c in (0.0021, 0.002, 0.0023))[1]
    assert policy.drain_rate() == pytest.approx(first)
    policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)  # the first pass ends: no re-send span yet
    assert policy.drain_rate() == pytest.approx(first)
    policy.on_load_pace(1.1, total_b + 3 * MIB, total_p + 768, busy + 0.0015, 0.0, busy + 0.0015)
    assert policy.drain_rate() == pytest.approx(3 * MIB / 0.0015)  # a re-send span of 1.5 ms counts


def _runs_policy() -> SwitchoverPolicy:
    """A first pass of long runs (100 MB windows of 10 runs), then re-send windows of scattered pages:
    0.4 ns a byte and 3 us a run of page work."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    for i in range(3):
        policy.on_window(0.1 * (i + 1), 100_000_000, 0.01, 0.01 + 0.04 + 10 * 3e-6, 0.1, 100_000_000, None,
                         None, 10)
    return policy


def test_a_pass_of_scattered_pages_costs_its_runs() -> None:
    """The page work of data windows is fitted to ``a bytes + b runs``: a final pass whose pages lie
    in more runs per byte than the windows measured costs more per byte (500M unlimited: a first
    pass of long runs at 0.36 ns/B, its final pass of scattered pages at 1.39)."""
    policy = _runs_policy()
    assert policy.run_cost() is None  # every window had the same mix: a run costs PRIOR_RUN_S meanwhile
    first = 1 / policy.final_rate() - 1 / policy.capacity.value
    policy.on_layout(40_000_000, 9000, 0.0)
    assert 1 / policy.final_rate() - 1 / policy.capacity.value == pytest.approx(
        first + PRIOR_RUN_S * (9000 / 40_000_000 - 10 / 100_000_000), rel=0.01)
    policy._final_rpb = None
    policy.on_sync(0.5, 60 * MIB, 60 * MIB, 60 * MIB)
    for i, runs in enumerate((2000, 1000, 1500)):
        policy.on_window(0.6 + 0.1 * i, 10_000_000, 0.001, 0.001 + 0.004 + runs * 3e-6, 0.1, 10_000_000, None,
                         None, runs)
    assert policy.run_cost() == pytest.approx(3e-6, rel=0.01)

    def cpu() -> float:
        return 1 / policy.final_rate() - 1 / policy.capacity.value

    assert cpu() == pytest.approx(0.85e-9, rel=0.01)  # the median window's cost, without a layout
    policy.on_layout(40_000_000, 9000, 0.0)  # more scattered than the median window
    assert cpu() == pytest.approx(0.4e-9 + 9000 * 3e-6 / 40_000_000, rel=0.01)
    policy.on_layout(40_000_000, 10, 0.0)  # one long run: never below half the measured cost
    assert cpu() == pytest.approx(0.85e-9 / 2, rel=0.01)


def test_a_run_cost_the_windows_do_not_show_is_not_fitted() -> None:
    """Capped windows of one size and a few runs each vary in time for other reasons than their runs:
    their fit (193 us a run, 1.6 standard errors above nothing) is no cost of a run, and the final
    pass of 200M on a 64 MiB hot set over 32 MiB/s was expected at 72 ms for 33 with it (prior
    instead: 41). Windows of different layouts whose runs explain their time are fitted, noise and
    all."""
    kib = 3280 * 1024
    capped = [(kib, 5, 1.52e-3), (kib, 8, 2.03e-3), (kib, 7, 3.0e-3), (kib, 5, 2.7e-3), (kib, 5, 1.76e-3),
              (kib, 7, 1.77e-3), (kib, 4, 1.49e-3), (kib, 4, 1.84e-3), (kib, 7, 3.0e-3), (kib, 4, 1.65e-3),
              (kib, 6, 1.49e-3)]
    assert _least_squares(capped, 0.05) is not None  # the two costs can be told apart ...
    assert _fit_run_cost(capped) is None  # ... but the runs do not explain the time
    # a destination's spans of the same kind (3.2-3.3 MB, 4-9 runs): 118 us a run at t = 2.4, but
    # their runs per byte span a factor 2.2 only (RUN_FIT_MIN_SPREAD): no cost of a run either
    spans = [(b << 10, r, c * 1e-3) for b, r, c in (
        (3216, 6, 1.38), (3280, 5, 1.04), (3280, 4, 1.61), (3280, 6, 1.42), (3280, 7, 2.09), (3280, 5, 1.54),
        (3280, 9, 1.94), (3280, 4, 1.12), (3216, 5, 1.65), (3344, 8, 2.3), (3216, 7, 1.81), (3280, 5, 1.65),
        (3280, 4, 1.52), (3280, 7, 1.53), (3280, 4, 1.76), (3280, 4, 1.48), (3280, 4, 1.41), (3216, 6, 1.3))]
    assert _least_squares(spans, 0.05) is not None
    assert _fit_run_cost(spans) is None
    noise = (1.0, 0.97, 1.03, 1.01, 0.99, 1.02)
    scattered = [(b, r, (0.4e-9 * b + 4e-6 * r) * n) for (b, r), n in
                 zip(((10_000_000, 2000), (12_000_000, 1000), (8_000_000, 1500), (9_000_000, 2500),
                      (11_000_000, 800), (10_000_000, 1800)), noise, strict=True)]
    fitted = _fit_run_cost(scattered)
    assert fitted is not None and fitted == pytest.approx(4e-6, rel=0.25)


@pytest.mark.parametrize("dirty", [0.3, 0.8, 0.9, 0.95, 0.99])
def test_run_share_is_what_a_uniform_writer_leaves(dirty: float) -> None:
    """``run_share``: the share of dirty pages in runs of 16 pages or more, for pages dirty at random
    with one probability each, against a random bitmap of a million pages."""
    bits = np.random.default_rng(11).random(1 << 20) < dirty
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.astype(np.int8), [0]))))
    lengths = edges[1::2] - edges[::2]
    measured = lengths[lengths >= 16].sum() / lengths.sum()
    assert run_share(dirty, 16) == pytest.approx(measured, abs=0.01)
    assert run_share(0.0, 16) == 0.0 and run_share(1.0, 16) == 1.0


def test_a_scattered_final_pass_waits_for_a_window_of_re_sends() -> None:
    """Right after a first pass of long runs the cost of a run is unknown: a scattered rest waits
    (at most RESEND_WAIT_S) for one window of re-sends before the first switch-over."""
    policy = _runs_policy()
    policy.on_sync(0.5, 40 * MIB, 40 * MIB, 40 * MIB)
    policy.on_layout(40 * MIB, 5000, 0.0)
    assert policy.decide(0.5, 40 * MIB, True).step is Step.ITERATE
    assert policy._wait_for_resend(0.6, 40 * MIB)
    assert not policy._wait_for_resend(0.5 + RESEND_WAIT_S + 0.01, 40 * MIB)  # bounded
    policy.on_window(0.6, 10_000_000, 0.001, 0.02, 0.1, 10_000_000, None, None, 1200)
    assert not policy._wait_for_resend(0.6, 40 * MIB)
    policy.on_layout(40 * MIB, 4, 0.0)  # a rest of runs as long as the first pass's never waited
    policy._run_samples.clear()
    assert not policy._wait_for_resend(0.6, 40 * MIB)


def test_the_destination_loads_a_scattered_final_pass_at_its_cost_of_a_run() -> None:
    """The destination's pace was measured on spans of the live rounds' layout; a final pass in more
    runs per byte costs it a run's cost more per run (DEST_PRIOR_RUN_S until its spans allow a fit):
    200M on a 64 MiB hot set over 128 MiB/s, spans of 6-9 pages a run at 1.1-1.7 GB/s, the final pass
    of 3.3 pages a run loaded at 0.68 GB/s."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)
    total = runs = 0
    cpu = 0.0
    policy.on_load_pace(1.0, total, 0, cpu, 0.0, cpu, runs)
    for i in range(4):  # 13.4 MB spans of 400 runs (8 pages a run), 10 ms of CPU each: 1.34 GB/s
        total, runs, cpu = total + 13_400_000, runs + 400, cpu + 0.010
        policy.on_load_pace(1.1 + i / 10, total, total // 4096, cpu, 0.0, cpu, runs)
    assert policy._final_load_rate() == pytest.approx(1.34e9)  # no layout yet: the spans' pace
    policy.on_layout(40_000_000, 12_000, 0.0)  # 3.3 pages a run
    expected = 1 / (1 / 1.34e9 + DEST_PRIOR_RUN_S * (12_000 / 40_000_000 - 400 / 13_400_000))
    assert policy._final_load_rate() == pytest.approx(expected)
    assert policy.final_rate() <= expected
    # spans of different layouts: the destination's own cost of a run, fitted (here 10 us)
    for i, (n, c) in enumerate(((100, 0.007), (1200, 0.018), (800, 0.014))):
        total, runs, cpu = total + 13_400_000, runs + n, cpu + c
        policy.on_load_pace(1.5 + i / 10, total, total // 4096, cpu, 0.0, cpu, runs)
    fitted = _fit_run_cost(policy._dest_run_spans)
    assert fitted is not None and fitted == pytest.approx(10e-6, rel=0.3)


def test_the_first_switchover_times_one_quiet_round_trip_and_only_once() -> None:
    """The PING that goes with the header finds a destination just starting (4-6 ms, where the
    switch-over's round trips took 0.4-1 ms): before the first switch-over one DRAIN times a round
    trip into an empty socket, which then stands for the switch-over's; asked once, so a PONG slower
    than the drain's wait delays nothing further."""
    policy = SwitchoverPolicy(lambda: {**DEFAULT_PARAMETERS, "downtime-limit": 50}, 64 * MIB, 0.0,
                              peer_answers=True)
    policy.round_trips = 2
    policy.on_rtt(0.006)  # the header's PING
    before = policy.expected_downtime_ms(0)
    assert policy.decide(0.01, 0, True).step is Step.DRAIN
    policy.on_rtt(0.0002, drained=True)
    assert policy.decide(0.011, 0, True).step is Step.SWITCHOVER
    assert policy.expected_downtime_ms(0) <= before - 11  # 2 x (6 - 0.2) ms less
    slow = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 64 * MIB, 0.0, peer_answers=True)
    slow.on_rtt(0.006)
    assert slow.decide(0.01, 0, True).step is Step.DRAIN
    assert slow.decide(0.07, 0, True).step is Step.SWITCHOVER  # no answer within the drain's wait


def test_a_scattered_final_pass_is_priced_from_the_span_the_drain_rate_came_from() -> None:
    """The destination's drain rate is its re-send spans' pace; the runs a final pass has more are
    counted against those spans' runs per byte, not against the median of every span with the first
    pass's long runs in it (200M on a 64 MiB hot set over 128 MiB/s: a re-send span of 38 runs per
    MB gave the rate, the median span 1.5; the final pass of 74 runs per MB expected at 0.60 GB/s,
    loaded at 1.2)."""
    p = dict(DEFAULT_PARAMETERS)
    policy = SwitchoverPolicy(lambda: p, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    total = runs = 0
    cpu = 0.0
    policy.on_load_pace(0.1, total, 0, cpu, 0.0, cpu, runs)
    for i in range(3):  # first sends: 13.4 MB in 20 runs, 2 ms of CPU each
        total, runs, cpu = total + 13_400_000, runs + 20, cpu + 0.002
        policy.on_load_pace(0.2 + i / 10, total, total // 4096, cpu, 0.0, cpu, runs)
    policy.on_sync(1.0, 60 * MIB, 60 * MIB, 60 * MIB)
    total, runs, cpu = total + 13_400_000, runs + 512, cpu + 0.0078  # one re-send span: 1.72 GB/s
    policy.on_load_pace(1.1, total, total // 4096, cpu, 0.0, cpu, runs)
    policy.on_layout(40_000_000, 2_960, 0.0)
    assert policy.drain_rate() == pytest.approx(13_400_000 / 0.0078)
    per_run = _fit_run_cost(policy._dest_run_spans) or DEST_PRIOR_RUN_S  # (here fitted: 11.8 us)
    expected = 1 / (0.0078 / 13_400_000 + per_run * (2_960 / 40_000_000 - 512 / 13_400_000))
    assert policy._final_load_rate() == pytest.approx(expected)
    assert policy._final_load_rate() > 0.9e9  # against the median span's 1.5 runs per MB: 0.55 GB/s


def test_a_span_that_loaded_no_page_is_no_pace() -> None:
    """The stream's start (64 KiB read and no page loaded in 4.7 ms) is no span of data pages: taken
    for one, it said 14 MB/s, and a 0.17 MB final pass was expected at 12 ms for 1.4."""
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    policy.on_load_pace(0.001, 166, 0, 0.0017, 0.0044, 0.001)
    policy.on_load_pace(0.01, 65_702, 0, 0.0064, 0.0044, 0.0013)
    assert policy.drain_rate() == 0.0 and not policy._dest_first


def test_the_fitted_drain_rate_is_never_below_what_one_span_loaded_its_data_at() -> None:
    """With only mixed spans (mostly zero pages, a capped guest's), the drain rate is the fit of their
    CPU to ``a pages + b bytes``; near-alike spans fitted 82 MB/s (218 ms expected for 2 real). A
    span's data pages took at most all of its CPU, so the best span's bytes / CPU s bound it below."""
    policy = SwitchoverPolicy(lambda: DEFAULT_PARAMETERS, 512 * MIB, 0.0)
    policy.on_sync(0.0, 512 * MIB, 512 * MIB)
    total = pages = 0
    cpu = 0.0
    policy.on_load_pace(0.1, total, pages, cpu, 0.0, cpu)
    spans = ((13677, 13488899, 0.0388), (14087, 13423361, 0.0459), (14235, 13424861, 0.0469),
             (14297, 13425323, 0.0277), (13839, 13424688, 0.0280), (14072, 13423250, 0.0278),
             (14250, 13425236, 0.0299), (13773, 13424574, 0.0442), (13842, 13424943, 0.0456))
    # recorded: 64M over 128 MiB/s, (pages, bytes, CPU s)
    for i, (n, sent, c) in enumerate(spans):
        total, pages, cpu = total + sent, pages + n, cpu + c
        policy.on_load_pace(0.2 + i / 10, total, pages, cpu, 0.0, cpu)
    assert not policy._dest_first and not policy._dest_paces  # no span of data pages: the fit counts
    assert policy.drain_rate() == pytest.approx(13425323 / 0.0277)  # the fit alone: 82 MB/s
