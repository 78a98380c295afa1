#!/usr/bin/env python3
"""Replay recorded policy traces through this tree's SwitchoverPolicy and judge its estimates.

A source daemon run with ``MIGD_POLICY_TRACE=DIR`` (``bench_scenarios.py`` sets it for every case)
writes one JSON trace per migration: every input its thread fed the policy, and the outcome. The
policy is pure, so this tree's model replays a trace made by any tree to the estimates it would have
published (since 5ea6199 the run publishes the switch-over decision's own figure, so a replay of the
recording tree is exactly what the run published). A model change is judged on the same traces
before and after — no migrations, no noise of the host — and only then on new runs.

    python3 bench/replay_traces.py DIR_OR_FILE... [--quiet]

Per completed trace: downtime-limit, max-bandwidth, real downtime, the expected downtime at the
first switch-over the replayed model decides and its error factor (an estimate within 5 ms counts as
exact, as in issue 10's bound), and the worst factor of the estimates from the first second up to
that switch-over. Last, how many traces hold each bound (factor <= 1.25 at the switch-over, <= 2
after the first second), and in how many the replayed model decides no switch-over at all: a model
that waits longer than the recording run did has no inputs for what followed, so those traces are
counted apart, not judged (scoring the last recorded decision instead, as this tool did before, gave
such a model the estimate of a decision that kept iterating). Replays a trace whose recorded decisions
the model would change too: its later inputs are then the consequence of other decisions, which the
summary cannot tell — compare trees on traces recorded by the older one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from migd.migration import policytrace  # noqa: E402
from migd.migration.policytrace import error_factor  # noqa: E402


def traces(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        out += sorted(path.glob("*.json")) if path.is_dir() else [path]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="trace files, or directories of them")
    ap.add_argument("--quiet", action="store_true", help="the summary only")
    args = ap.parse_args()
    held = early = total = waits = 0
    for path in traces(args.paths):
        doc = json.loads(path.read_text())
        outcome, params = doc["outcome"], doc["params"]
        if outcome.get("status") != "completed" or not outcome.get("downtime"):
            continue
        _, decisions = policytrace.replay(doc)
        real = outcome["downtime"]
        total += 1
        head = f"{path.name}: limit {params.get('downtime-limit')} bw {int(params.get('max-bandwidth', 0)) >> 20}M real {real}"
        judged = policytrace.judged(doc, decisions)
        if judged is None:
            waits += 1
            if not args.quiet:
                print(f"{head} no switch-over replayed")
            continue
        expected, worst = judged
        held += error_factor(expected, real) <= 1.25
        early += worst is None or worst <= 2
        if not args.quiet:
            print(f"{head} expected {expected} x{error_factor(expected, real):.2f} "
                  f"after 1 s {'-' if worst is None else f'x{worst:.2f}'}")
    print(f"# {total} completed traces: at the switch-over within x1.25 (or 5 ms) {held}, "
          f"within x2 after the first second {early}; no switch-over replayed in {waits}")


if __name__ == "__main__":
    main()
