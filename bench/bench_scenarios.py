#!/usr/bin/env python3
"""Convergence scenarios (issue 10): does the estimate hold, does the migration converge?

Real source and destination migd processes over a unix socket. For each case (workload x
max-bandwidth x downtime-limit) a second QMP connection polls ``query-migrate`` every 10 ms and
records ``expected-downtime`` and ``x-migd-convergence``; at the end the daemon's estimate at the
switch-over (``x-migd-expected-downtime``) is held against the measured ``downtime``.

    python3 bench/bench_scenarios.py [--memory 512M] [--cases idle:0:300,random,rate=64M:0:300]
                                     [--timeout 60] [--set x-migd-progress-timeout=10]

A case is ``workload:max-bandwidth:downtime-limit`` (sizes with K/M/G suffixes); the workload may
contain commas. Prints one table row per case: total time, downtime, expected at switch-over and its
ratio, the worst ratio after the first second, bytes sent, the convergence states seen and the
policy actions that fired.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query_latency import SETTLE, parse_size, start_pair  # noqa: E402

DEFAULT_CASES = (
    "idle:0:300",
    "random,rate=64M:0:300",
    "random,rate=64M:128M:300",
    "random,rate=32M:32M:300",
    "random,rate=100M,wss=128M:32M:50",
)
TERMINAL = ("completed", "failed", "cancelled")


def parse_case(text: str) -> tuple[str, int, int]:
    workload, bandwidth, limit = text.rsplit(":", 2)
    return workload, parse_size(bandwidth), int(limit)


def parse_value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    try:
        return parse_size(text)
    except ValueError:
        return text


async def one_case(tmp: Path, memory: int, case: str, timeout: float,
                   extra: dict[str, Any]) -> dict[str, Any]:
    workload, bandwidth, limit = parse_case(case)
    src, dst = await start_pair(tmp, memory, workload, None)
    try:
        control, probe = await src.client(), await src.client()
        await control.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "events", "state": True}]})
        await control.execute("migrate-set-parameters",
                              {"max-bandwidth": bandwidth, "downtime-limit": limit, **extra})
        await asyncio.sleep(SETTLE)
        samples: list[tuple[float, int, dict[str, Any]]] = []
        t0 = time.monotonic()
        await control.execute("migrate", {"uri": f"unix:{tmp}/mig.sock"})
        info: dict[str, Any] = {}
        while time.monotonic() - t0 < timeout:
            info = await probe.execute("query-migrate")
            if info.get("status") == "active":
                samples.append((time.monotonic() - t0, info.get("expected-downtime", 0),
                                info.get("x-migd-convergence", {})))
            if info.get("status") in TERMINAL:
                break
            await asyncio.sleep(0.01)
        else:
            await control.execute("migrate_cancel")
            info = {**info, "status": "timeout"}
        digest_ok = None
        if info.get("status") == "completed":
            dclient = await dst.client()
            digest_ok = (await control.execute("x-migd-ram-digest")
                         == await dclient.execute("x-migd-ram-digest"))
            await dclient.disconnect()
        for c in (control, probe):
            await c.disconnect()
    finally:
        src.stop()
        dst.stop()
    downtime = info.get("downtime")
    expected = info.get("x-migd-expected-downtime")
    late = [e for t, e, _ in samples if t >= 1.0]
    worst = None
    if downtime and late:
        worst = max(max(e / downtime, downtime / e) if e else float("inf") for e in late)
    states: list[str] = []
    for _, _, conv in samples:
        st = conv.get("state")
        if st and (not states or states[-1] != st):
            states.append(st)
    actions = [a.get("action") for a in info.get("x-migd-policy-actions", [])]
    return {
        "case": case, "status": info.get("status"), "digest": digest_ok,
        "total": info.get("total-time"), "downtime": downtime, "expected": expected,
        "ratio": round(expected / downtime, 2) if expected and downtime else None,
        "worst_after_1s": round(worst, 2) if worst is not None else None,
        "sent_mb": round(info.get("ram", {}).get("transferred", 0) / 2**20),
        "states": ">".join(states), "actions": ",".join(str(a) for a in actions),
        "phases": info.get("x-migd-downtime-phases"), "error": info.get("error-desc"),
        "trace": [(round(t, 2), e, c.get("state"), c.get("eta-ms")) for t, e, c in samples[::10]],
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--cases", default=";".join(DEFAULT_CASES), help="';'-separated cases")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the daemons' logs (printed path)")
    ap.add_argument("--trace", action="store_true", help="print every 10th sample (s, expected, state, eta)")
    ap.add_argument("--phases", action="store_true", help="print each case's downtime phases")
    ap.add_argument("--set", action="append", default=[], help="extra parameter name=value")
    args = ap.parse_args()
    extra = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    memory = parse_size(args.memory)
    tmp = Path(tempfile.mkdtemp(prefix="migd-scen-", dir="/dev/shm"))
    cols = ("case", "status", "digest", "total", "downtime", "expected", "ratio", "worst_after_1s",
            "sent_mb", "states", "actions")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    ok = True
    try:
        for i, case in enumerate(args.cases.split(";")):
            run_dir = tmp / f"case{i}"
            run_dir.mkdir()
            r = await one_case(run_dir, memory, case, args.timeout, extra)
            ok &= r["status"] == "completed"
            print("| " + " | ".join(str(r[c]) for c in cols) + " |", flush=True)
            if args.trace:
                print(f"  trace: {r['trace']}", flush=True)
            if args.phases or r["error"]:
                print(f"  phases: {r['phases']} error: {r['error']}", flush=True)
    finally:
        if args.keep:
            print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
