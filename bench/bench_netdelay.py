#!/usr/bin/env python3
"""Live migration over TCP with network delay each way: the TCP case of issue 10's scenario benchmark.

Loopback has no latency, so a migration that stalls once a round trip costs a few milliseconds passes
every other bench. This one builds the fault bed of tests/netfault.py (two network namespaces joined by
a veth pair; the kernel has no ``sch_netem``, so the delay comes from the delaying relay of
tests/delay_relay.py inside the destination's namespace) and migrates a running guest from one
namespace to the other for each delay: 0 (straight over the veth pair, no relay), then through the relay.
A case that has not completed after ``--timeout`` s is cancelled and reported with what it sent.

For each delay: outcome, total time, downtime, ``x-migd-expected-downtime`` at the switch-over, RAM
bytes sent (``ram.transferred``; against the guest size it shows how much was sent again; for a
cancelled case the figures are the last ones before the cancel, the estimate being ``expected-downtime``), the
catch-up round trips the source logged, and whether the RAM digests are equal. Needs root and
iproute2; prints why and exits 0 where namespaces cannot be made.

    sudo python3 bench/bench_netdelay.py [--delays 0,1,10,50] [--memory 128M] [--workload counter,rate=4M]
                                         [--timeout 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import Migd  # noqa: E402
from netfault import ADDR_B, NetPair, unavailable  # noqa: E402

ENDED = ("completed", "failed", "cancelled")


def query(m: Migd) -> dict[str, Any]:
    info: dict[str, Any] = m.cmd("query-migrate")
    return info


def digests(m: Migd) -> dict[str, str]:
    return {b["name"]: b["digest"] for b in m.cmd("x-migd-ram-digest")["blocks"]}


def wait_ended(m: Migd, timeout: float) -> tuple[bool, dict[str, Any]]:
    """Whether the migration ended within ``timeout`` s, and the last query-migrate (main thread)."""
    deadline = time.monotonic() + timeout
    while True:
        info = query(m)
        if info.get("status") in ENDED:
            return True, info
        if time.monotonic() > deadline:
            return False, info
        time.sleep(0.05)


def one_case(work: Path, delay_ms: float, memory: str, workload: str, timeout: float) -> dict[str, Any]:
    """One migration from namespace a to b through ``delay_ms`` each way; its figures (main thread)."""
    net = NetPair().create()
    started: list[Migd] = []
    tag = f"{delay_ms:g}ms"
    try:
        src = Migd(work, f"src-{tag}", "-m", memory, "--workload", workload, prefix=net.prefix("a"))
        started.append(src)
        host = ADDR_B if delay_ms == 0 else "127.0.0.1"
        dst = Migd(work, f"dst-{tag}", "-m", memory, "-S", "--incoming", f"tcp:{host}:0",
                   prefix=net.prefix("b"))
        started.append(dst)
        port = int(query(dst)["socket-address"][0]["port"])
        uri = f"tcp:{ADDR_B}:{port}" if delay_ms == 0 else net.relay(port, delay_ms / 1000).uri
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        began = time.monotonic()
        src.cmd("migrate", uri=uri)
        ended, info = wait_ended(src, timeout)  # when it did not end: the figures before the cancel
        wall = time.monotonic() - began
        if ended:
            outcome = str(info["status"])
        else:
            src.cmd("migrate_cancel")
            wait_ended(src, 10)
            outcome = f"never (cancelled at {timeout:g} s)"
        equal = None
        if info.get("status") == "completed" and wait_ended(dst, 10)[0]:
            equal = digests(src) == digests(dst)
        return {
            "delay-ms": delay_ms, "outcome": outcome, "seconds": round(wall, 2),
            "downtime-ms": info.get("downtime"), "expected-ms": info.get("x-migd-expected-downtime", info.get("expected-downtime")),
            "ram-sent": info.get("ram", {}).get("transferred"),
            "catch-ups": src.log().count("catch-up:"), "digests-equal": equal,
        }
    finally:
        for m in started:
            m.kill()
        net.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,1,10,50", help="ms each way, comma-separated (0: no relay)")
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--workload", default="counter,rate=4M")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a case is cancelled")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"bench_netdelay skipped: {reason}")
        return 0
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    work = Path(tempfile.mkdtemp(prefix="migd-netdelay-"))
    rows = []
    try:
        for delay in delays:
            rows.append(one_case(work, delay, args.memory, args.workload, args.timeout))
            print(f"{delay:g} ms: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{args.memory} guest, `{args.workload}`, max-bandwidth 0, TCP between two namespaces")
    print()
    print("| delay each way | outcome | s | downtime ms | expected ms | RAM sent MB | catch-ups | digests equal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sent = f"{r['ram-sent'] / 1e6:.1f}" if r["ram-sent"] is not None else "–"
        print(f"| {r['delay-ms']:g} ms | {r['outcome']} | {r['seconds']} | {r['downtime-ms'] or '–'} | "
              f"{r['expected-ms'] or '–'} | {sent} | {r['catch-ups']} | {r['digests-equal']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
