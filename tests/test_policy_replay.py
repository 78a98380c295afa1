"""Recorded real migrations replayed through SwitchoverPolicy: no threads, no sockets.

Each file in tests/data/policy_traces was written by a source daemon run with
``MIGD_POLICY_TRACE`` (``bench/bench_scenarios.py``, 512 MiB guest, unix socket, a loaded 2-core
machine; the ``-fresh`` ones on a quiet one): every input the migration thread fed its policy and the
outcome. The policy is pure, so fed the same inputs it takes the same decisions: these tests hold the
model's estimates against what really happened. A model change that changes a decision makes the
later inputs of a trace no longer the consequence of the replayed decisions; record the traces again
then (the file names say which bench case).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migd.migration import policytrace
from migd.migration.policy import Step
from migd.migration.policytrace import error_factor

TRACES = sorted((Path(__file__).parent / "data" / "policy_traces").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_a_recorded_run_replays_to_its_own_switchover(path: Path) -> None:
    doc = load(path)
    _, decisions = policytrace.replay(doc)
    steps = [d.step for _, _, d in decisions]
    assert steps[-1] is Step.SWITCHOVER  # the run's last decision
    assert Step.SWITCHOVER not in steps[:-1]


# Held after the first second except where a known gap says otherwise (with a test of its own):
# 16M-unlimited (recorded at a load of 4-7 on 2 cores): the socket's backlog swings between 2.5 and
# 8.3 MB from one decision to the next and one sync took 8.4 ms: 6 to 28 ms estimated for 15 in the
# first 0.2 s after the first second.
# 64M-unlimited-pace (load 3 on 2 cores): between 1.8 and 2.4 s the plan forecast the threshold (228-240
# ms, a plan that did not fit yet) for a switch-over that came at 3.1 s with 24 ms; the destination's
# pace does not change that part (the plan's), its test below holds what it does change.
# 16M-128M-pace (load 2-3): 6.9 MB still in the socket under a 128 MiB/s cap, loaded in ~35 ms, at
# a pace of 370 MB/s reported: 22 ms expected for 40 (x1.8); its test below.
GAPS = {"16M-unlimited", "64M-unlimited-pace", "16M-128M-pace"}
HELD = [p for p in TRACES if p.stem not in GAPS]
# 16M-32M: until the second PONG (at 1.1 s) the only round trip is the first PING's, sent with the
# header while the destination was still setting up (3.2 ms, twice: LOADED and SHUT): 10 ms
# expected at 1.03 s for a 4 ms downtime. Held from the second PONG on.
EARLY_RTT = {"16M-32M": 1.2}


@pytest.mark.parametrize("path", HELD, ids=[p.stem for p in HELD])
def test_the_estimate_of_a_recorded_run_holds(path: Path) -> None:
    """Within ±25 % (or 5 ms) at the switch-over, within x2 from the first second on."""
    doc = load(path)
    _, decisions = policytrace.replay(doc)
    real = doc["outcome"]["downtime"]
    at_switchover = decisions[-1][1]
    assert error_factor(at_switchover, real) <= 1.25, (at_switchover, real)
    since = EARLY_RTT.get(path.stem, 1.0)
    late = [(round(t - doc["start"], 2), e) for t, e, _ in decisions if t - doc["start"] >= since]
    if late:  # (a run that switched over within its first second has no later estimates)
        worst = max(late, key=lambda te: error_factor(te[1], real))
        assert error_factor(worst[1], real) <= 2, (worst, real)


def trace(stem: str) -> dict[str, Any]:
    return load(next(p for p in TRACES if p.stem == stem))


def test_a_plan_that_does_not_fit_forecasts_the_threshold() -> None:
    """200 MiB/s on a 64 MiB hot set over 32 MiB/s: the first pass sends the hot pages at 8-42 ns/B
    of the thread's time, the rounds after it at 0.6-1, so during it the 64 MB the plan ends with
    look like seconds of downtime (661 ms planned, x2.7). But the decision never switches over above
    its threshold: the switch-over came at 57 MB, 244 ms for a limit of 300, and a plan that does
    not fit forecasts the threshold's downtime."""
    doc = trace("200M-hot64M-32M")
    policy, decisions = policytrace.replay(doc)
    real = doc["outcome"]["downtime"]
    first_end = [c[1] for c in doc["calls"] if c[0] == "on_sync"][1]
    in_first_pass = [e for t, e, _ in decisions if 1.0 <= t - doc["start"] and t < first_end]
    assert in_first_pass and all(error_factor(e, real) <= 2 for e in in_first_pass), (in_first_pass, real)
    assert max(in_first_pass) <= doc["params"]["downtime-limit"]
    assert policy.cpu_per_byte.samples and policy._cpu_first is not None
    assert policy.cpu_per_byte.value < policy._cpu_first / 4  # re-sends are cheaper than first sends


def test_first_pass_probes_give_way_to_the_rounds_after_it() -> None:
    """200M on a 64 MiB hot set over 128 MiB/s: one probe in the first pass said 55 MB/s, the final
    pass ran at 650. Past the first pass, until a probe of re-sends, the rounds' own cost stands."""
    doc = trace("200M-hot64M-128M")
    real = doc["outcome"]["downtime"]
    first_end = [c[1] for c in doc["calls"] if c[0] == "on_sync"][1]
    policy, decisions = policytrace.replay(doc, until=first_end + 0.5)
    assert policy.load_rate() == 0.0  # no probe of re-sends yet: the first pass's one no longer counts
    assert error_factor(decisions[-1][1], real) <= 2, (decisions[-1][1], real)


def test_the_backlog_in_the_socket_is_part_of_the_downtime() -> None:
    """16M unlimited: nothing left to send at the switch-over, but 3.6 MB in the socket that the
    destination had not read yet (LOADED came after 8.8 ms, of a 15 ms downtime). Counted at the
    pace the destination frees the socket, the estimate holds; without it, it is a fifth."""
    doc = trace("16M-unlimited")
    policy, decisions = policytrace.replay(doc)
    real = doc["outcome"]["downtime"]
    assert policy.backlog > 3 << 20
    assert error_factor(decisions[-1][1], real) <= 1.25, (decisions[-1][1], real)
    blind = {**doc, "calls": [c if c[0] != "on_backlog" else ["on_backlog", 0] for c in doc["calls"]]}
    _, without = policytrace.replay(blind)
    assert error_factor(without[-1][1], real) >= 4, (without[-1][1], real)


def without_pace(doc: dict[str, Any]) -> dict[str, Any]:
    """The same run as a source that heard no LOAD_PACE report (an older migd destination)."""
    return {**doc, "calls": [c for c in doc["calls"] if c[0] != "on_load_pace"]}


@pytest.mark.parametrize(("stem", "blind_factor"), [("16M-unlimited-pace", 4), ("64M-unlimited-pace", 1.8)])
def test_the_backlog_drains_at_the_destinations_pace(stem: str, blind_factor: float) -> None:
    """Uncapped, the socket held 4.7 MB (64M) and 7.8 MB (16M) at the switch-over that the destination
    had not read. Counted at the link capacity measured while the vCPUs ran (763 and 191 MB/s), the
    64M estimate was 13 for 24 ms and the 16M one 70 for 17 (that capacity counts the first pass's
    zero pages against few wire bytes); at the pace the destination reported (372 MB/s of data pages on
    a CPU; for 16M, fitted from its spans of mixed pages) both hold."""
    doc = trace(stem)
    real = doc["outcome"]["downtime"]
    policy, decisions = policytrace.replay(doc)
    assert policy.backlog > 2 << 20 and policy.drain_rate() > 0
    assert error_factor(decisions[-1][1], real) <= 1.25, (decisions[-1][1], real)
    _, blind = policytrace.replay(without_pace(doc))
    assert error_factor(blind[-1][1], real) >= blind_factor, (blind[-1][1], real)


def test_the_final_pass_goes_no_faster_than_the_destination() -> None:
    """200M on a 64 MiB hot set over 128 MiB/s: the final pass's rate is bounded by the pace the
    destination reported for data pages on a CPU of its own; the estimate held (recorded again in
    the fifth session, with the probe wait: 49 for 60 ms)."""
    doc = trace("200M-hot64M-128M-pace")
    real = doc["outcome"]["downtime"]
    policy, decisions = policytrace.replay(doc)
    assert policy.drain_rate() > 0 and policy.final_rate() <= policy.drain_rate()
    assert error_factor(decisions[-1][1], real) <= 1.25, (decisions[-1][1], real)


def test_under_a_rate_limit_the_backlog_counts_too() -> None:
    """16M over 128 MiB/s: a window's burst of 12.8 MB lands in the socket at once, and at the
    switch-over 6.9 MB of it were still there. Without the destination's pace the backlog was not
    counted under a rate limit (3 ms expected for 40); at its reported pace it is (22 for 40)."""
    doc = trace("16M-128M-pace")
    real = doc["outcome"]["downtime"]
    policy, decisions = policytrace.replay(doc)
    assert doc["params"]["max-bandwidth"] and policy.backlog > 4 << 20 and policy.drain_rate() > 0
    assert error_factor(decisions[-1][1], real) <= 2, (decisions[-1][1], real)
    _, blind = policytrace.replay(without_pace(doc))
    assert error_factor(blind[-1][1], real) >= 4, (blind[-1][1], real)


@pytest.mark.parametrize("stem", ["16M-unlimited-drain", "64M-unlimited-50-drain"])
def test_a_recorded_switchover_drained_the_socket_first(stem: str) -> None:
    """Recorded with the drain (fifth session, quiet host): the switch-over was decided with MBs in the
    socket, drained first, and decided again with it nearly empty; the downtime had no backlog to load
    (16M: 5 ms, 4 expected; 64M at 50 ms: 4, 7 expected)."""
    doc = trace(stem)
    backlogs = policytrace.backlogs_at_decisions(doc)
    policy, decisions = policytrace.replay(doc)
    steps = [d.step for _, _, d in decisions]
    drained = [b for s, b in zip(steps, backlogs, strict=True) if s is Step.DRAIN]
    assert drained and min(drained) > policy.drain_target()
    assert steps[-1] is Step.SWITCHOVER and backlogs[-1] <= policy.drain_target()
    assert error_factor(decisions[-1][1], doc["outcome"]["downtime"]) <= 1.25


BENCH_TRACES = Path(__file__).resolve().parent.parent / "bench" / "traces"


@pytest.mark.parametrize("run", [1, 2, 5])
def test_a_capped_first_pass_does_not_switch_over_before_a_resend_was_measured(run: int) -> None:
    """200M on a 64 MiB hot set over 128 MiB/s at 50 ms, recorded before the rule (bench/traces):
    right after the first pass, with only first-pass spans of the destination (2-5 GB/s) and its
    fitted costs, it switched over with ~48 MB left and ended 52-58 ms over a 50 ms limit. Replayed
    now, that decision waits (the guest running) for a probe or a span of re-sent pages; recorded
    with the rule, the same case switched over after re-sends were measured: 38 for 38 ms."""
    doc = json.loads((BENCH_TRACES / f"200M-hot64M-128M-50-run{run}.json").read_text())
    assert doc["outcome"]["downtime"] > doc["params"]["downtime-limit"]
    policy, decisions = policytrace.replay(doc)
    assert not policy._dest_paces and decisions[-1][2].step is not Step.SWITCHOVER
    after = trace("200M-hot64M-128M-50-probe")
    policy, decisions = policytrace.replay(after)
    assert policy._dest_paces and decisions[-1][2].step is Step.SWITCHOVER
    assert after["outcome"]["downtime"] <= after["params"]["downtime-limit"]


def test_bench_replay_traces_counts_what_the_replays_hold() -> None:
    """``bench/replay_traces.py`` (the A/B of a model change on recorded traces) counts the traces
    whose replayed estimate at the replay's first switch-over holds each bound, as this module judges
    them, and apart those where the replayed model decides no switch-over."""
    held = early = waits = 0
    for path in TRACES:
        doc = load(path)
        _, decisions = policytrace.replay(doc)
        judged = policytrace.judged(doc, decisions)
        if judged is None:
            waits += 1
            continue
        expected, worst = judged
        held += error_factor(expected, doc["outcome"]["downtime"]) <= 1.25
        early += worst is None or worst <= 2
    tool = Path(__file__).resolve().parent.parent / "bench" / "replay_traces.py"
    out = subprocess.run([sys.executable, str(tool), "--quiet", str(TRACES[0].parent)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == (f"# {len(TRACES)} completed traces: at the switch-over within x1.25 (or 5 ms) "
                           f"{held}, within x2 after the first second {early}; no switch-over replayed "
                           f"in {waits}"), out


def test_first_switchover_is_the_replay_s_own() -> None:
    """A replay is judged at its own first SWITCHOVER; a model that keeps iterating where the run
    switched over has no switch-over to judge (its last decision was no switch-over)."""
    doc = load(TRACES[0])
    _, decisions = policytrace.replay(doc)
    switch = policytrace.first_switchover(decisions)
    assert switch is not None and decisions[switch][2].step is Step.SWITCHOVER
    assert all(d.step is not Step.SWITCHOVER for _, _, d in decisions[:switch])
    assert policytrace.first_switchover(decisions[:switch]) is None
    assert policytrace.judged(doc, decisions[:switch]) is None  # nothing to judge
    expected, worst = policytrace.judged(doc, decisions) or (None, None)
    assert expected == decisions[switch][1]
    real = doc["outcome"]["downtime"]
    late = [error_factor(e, real) for t, e, _ in decisions[: switch + 1] if t - doc["start"] >= 1.0]
    assert worst == (max(late) if late else None)  # the estimates up to the switch-over, not after


def test_a_capped_first_pass_plans_the_layout_a_uniform_writer_leaves() -> None:
    """The anchor (500M over 100 MiB/s, x-migd-auto-throttle; bench/traces/matrix-2026-12-02, recorded
    before the thread fed ``on_references``): during its 4.4 s first pass no sync has shown a layout.
    Planned as copying writes, the rest (all of the RAM, rewritten) did not fit at 1.6 GB/s and the
    plan counted on a throttle: 1-3 ms expected for a 203 ms downtime. Planned as a uniform writer
    leaves it, in long runs that leave as page references, it fits: within x2 from the first second
    until the first pass ends. Decisions are the same either way."""
    doc = json.loads((BENCH_TRACES / "matrix-2026-12-02" / "500M-100M-300-auto-throttle.json").read_text())
    real = doc["outcome"]["downtime"]
    first_pass_end = next(c[1] for c in doc["calls"][1:] if c[0] == "on_sync")
    _, copying = policytrace.replay(doc)
    told = {**doc, "calls": [["on_references", True], *doc["calls"]]}  # unix socket, page runs, one channel
    _, by_reference = policytrace.replay(told)
    assert [d for _, _, d in copying] == [d for _, _, d in by_reference]
    during = [(t, e) for t, e, _ in by_reference if 1.0 <= t - doc["start"] and t < first_pass_end]
    assert len(during) >= 20 and all(error_factor(e, real) <= 2 for _, e in during), (during, real)
    assert max(e for t, e, _ in copying if 1.0 <= t - doc["start"] and t < first_pass_end) < 10


def test_the_switchover_counts_on_a_quiet_round_trip() -> None:
    """16M unlimited at 50 ms (eighth session, a quiet machine): the header's PING took 8.7 ms, the
    first switch-over DRAINed once and timed 0.15 ms into the empty socket; LOADED and SHUT took 0.4
    and 0.5. The stream's start (64 KiB, no page loaded) no longer counts as a span of data pages."""
    doc = trace("16M-unlimited-50-quiet")
    policy, decisions = policytrace.replay(doc)
    steps = [d.step for _, _, d in decisions]
    assert Step.DRAIN in steps and steps[-1] is Step.SWITCHOVER
    assert policy.rtt_ms() < 1 and max(policy._rtt) > 0.008
    assert error_factor(decisions[-1][1], doc["outcome"]["downtime"]) <= 1.25, decisions[-1][1]


def test_a_capped_small_guest_holds_after_the_first_second() -> None:
    """64M over 128 MiB/s (eighth session): until its first span of data pages the destination's pace
    was the fit of mixed spans, 82 MB/s, and the estimate at 1.01 s 218 ms for 2; the best span's
    bytes / CPU s bound the fit below."""
    doc = trace("64M-128M-fit-floor")
    _, decisions = policytrace.replay(doc)
    real = doc["outcome"]["downtime"]
    late = [e for t, e, _ in decisions if t - doc["start"] >= 1.0]
    assert late and max(error_factor(e, real) for e in late) <= 2, late
