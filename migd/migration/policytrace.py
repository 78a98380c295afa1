"""Recording a migration's policy inputs, to replay them without threads (tests, bench).

With ``MIGD_POLICY_TRACE=<dir>`` in a source daemon's environment, every outgoing migration records
what its thread fed the ``SwitchoverPolicy`` (``on_window``, ``on_sync``, ``on_dirty_log``,
``on_rtt``, ``on_phase``, ``decide``), the parameters at the start, and the outcome (real downtime,
the expected downtime at the switch-over, the published estimates), and writes it as one JSON file
in ``<dir>`` when the migration ends. ``replay`` feeds such a trace to a new policy: the policy is
pure, so the replay makes the same decisions and estimates as the run did — a recorded trace is a
deterministic test of a model change.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from migd.migration.policy import Decision, Step, SwitchoverPolicy

ENV = "MIGD_POLICY_TRACE"
SMALL_MS = 5  # issue 10's bound: below 20 ms of downtime, an estimate within 5 ms holds


def error_factor(expected: float, real: float) -> float:
    """How far an estimate is from the real downtime, as a factor (1.0 within SMALL_MS): what the
    bench, the replay tool and the replay tests judge estimates by."""
    if abs(expected - real) <= SMALL_MS:
        return 1.0
    if expected <= 0 or real <= 0:
        return float("inf")
    return max(expected / real, real / expected)


def start(policy: SwitchoverPolicy) -> None:
    """(migration thread) Record this policy's inputs when the environment asks for it."""
    if os.environ.get(ENV):
        policy.trace = []


def save(policy: SwitchoverPolicy, params: Mapping[str, Any], outcome: Mapping[str, Any]) -> Path | None:
    """(migration thread) Write the recorded trace; None when not recording or the write failed."""
    where = os.environ.get(ENV)
    if policy.trace is None or not where:
        return None
    path = Path(where) / f"policy-{os.getpid()}-{time.time_ns()}.json"
    doc = {"ram_total": policy.ram_total, "start": policy.start, "peer_answers": policy.peer_answers,
           "round_trips": policy.round_trips, "drains": True, "quiet_rtt": True,
           "params": {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))},
           "outcome": dict(outcome), "calls": policy.trace}
    try:
        path.write_text(json.dumps(doc))
    except OSError:
        return None
    return path


def replay(doc: Mapping[str, Any], params: Mapping[str, Any] | None = None,
           until: float | None = None) -> tuple[SwitchoverPolicy, list[tuple[float, int, Decision]]]:
    """Feed a recorded trace to a fresh policy (``params`` override the recorded ones), up to the
    ``decide`` at ``until``; returns the policy and, per decision, (time, expected downtime, decision).
    The switch-over's round trips are the run's final count from the start (the run learnt it with
    its first PONG). A trace recorded before the switch-over drained the socket's backlog first
    (no ``drains`` in it) replays as a destination that never drains, and one recorded before the
    thread timed a quiet round trip before the switch-over (no ``quiet_rtt``) without asking for
    one: as they were recorded."""
    p = {**doc["params"], **(params or {})}
    policy = SwitchoverPolicy(lambda: p, int(doc["ram_total"]), float(doc["start"]),
                              peer_answers=bool(doc["peer_answers"]))
    policy.round_trips = int(doc.get("round_trips", 1))
    policy.drain_gave_up = not doc.get("drains", False)
    policy.times_quiet_rtt = bool(doc.get("quiet_rtt", False))
    out: list[tuple[float, int, Decision]] = []
    for name, *args in doc["calls"]:
        if name == "decide":
            now, remaining, exact = args
            if until is not None and now > until:
                break
            decision = policy.decide(now, remaining, exact)
            out.append((now, policy.expected_downtime_ms(remaining), decision))
        elif name == "peer_silent":
            policy.peer_silent()
        else:
            getattr(policy, name)(*args)
    return policy, out


def first_switchover(decisions: list[tuple[float, int, Decision]]) -> int | None:
    """The index of a replay's first SWITCHOVER decision (None: the replayed model decided none,
    where the recording run switched over: what would have followed is not in the trace)."""
    return next((i for i, (_, _, d) in enumerate(decisions) if d.step is Step.SWITCHOVER), None)


def judged(doc: Mapping[str, Any], decisions: list[tuple[float, int, Decision]]) -> tuple[int, float | None] | None:
    """A replay judged against its trace's real downtime: the expected downtime at the replay's first
    switch-over, and the worst error factor of its estimates from the first second up to it (None:
    none that late); None where the replayed model decides no switch-over."""
    switch = first_switchover(decisions)
    if switch is None:
        return None
    real = doc["outcome"]["downtime"]
    late = [e for t, e, _ in decisions[: switch + 1] if t - doc["start"] >= 1.0]
    return decisions[switch][1], max((error_factor(e, real) for e in late), default=None)


def backlogs_at_decisions(doc: Mapping[str, Any]) -> list[int]:
    """The socket's backlog (``on_backlog``) each recorded ``decide`` saw, in order: what a replay's
    decisions are to be read against (a DRAIN, a switch-over with the socket nearly empty)."""
    out: list[int] = []
    backlog = 0
    for name, *args in doc["calls"]:
        if name == "on_backlog":
            backlog = int(args[0])
        elif name == "decide":
            out.append(backlog)
    return out
