#!/usr/bin/env python3
"""Migration throughput and downtime honesty: 1 GiB of random pages and of zero pages.

Real source and destination migd processes over a unix socket, ``max-bandwidth 0`` (``--max-bandwidth`` for another value). Cases:

- ``random``: the source's RAM is a /dev/shm file of random bytes (every page is sent as data);
- ``random-running``: the same with the guest running ``random,rate=32M`` during the migration;
- ``zero``: RAM the guest never touched (pages need not even be read).

A second QMP connection polls ``query-migrate`` every few ms to catch the last ``expected-downtime``
before the switch-over, which is compared with the measured ``downtime``.

    python3 bench/bench_migrate.py [--memory 1G] [--runs 3] [--cases random,zero,random-running]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_query_latency import SETTLE, parse_size, random_file, start_pair  # noqa: E402

CASES = {
    "random": ("idle", True),
    "random-running": ("random,rate=32M", True),
    "zero": ("idle", False),
}


async def one_run(tmp: Path, memory: int, workload: str, mem_path: Path | None,
                  max_bandwidth: int = 0) -> dict[str, Any]:
    src, dst = await start_pair(tmp, memory, workload, mem_path, None)
    try:
        control, probe = await src.client(), await src.client()
        dclient = await dst.client()
        await dclient.execute("migrate-incoming", {"uri": f"unix:{tmp}/mig.sock"})  # the pair defers
        await control.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth})
        await asyncio.sleep(SETTLE)
        last_expected: int | None = None

        async def poll() -> dict[str, Any]:
            nonlocal last_expected
            while True:
                info = await probe.execute("query-migrate")
                if info.get("status") == "active":
                    last_expected = info.get("expected-downtime")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    return info
                await asyncio.sleep(0.005)

        poller = asyncio.create_task(poll())
        t0 = time.monotonic()
        await control.execute("migrate", {"uri": f"unix:{tmp}/mig.sock"})
        info = await asyncio.wait_for(poller, 600)
        wall = time.monotonic() - t0
        dinfo = await dclient.execute("query-migrate")
        digest_ok = None
        try:
            s = await control.execute("x-migd-ram-digest")
            d = await dclient.execute("x-migd-ram-digest")
            digest_ok = s == d
        except Exception:  # digest command not available: report unknown
            digest_ok = None
        for c in (control, probe, dclient):
            await c.disconnect()
    finally:
        src.stop()
        dst.stop()
    total_ms = info.get("total-time") or int(wall * 1000)
    # the daemon's own estimate at the switch-over beats the last poll (a short migration has none)
    last_expected = info.get("x-migd-expected-downtime", last_expected)
    return {
        "status": info["status"],
        "dest_status": dinfo.get("status"),
        "digest_equal": digest_ok,
        "total_time_ms": total_ms,
        "gb_per_s": round(memory / (total_ms / 1000) / 1e9, 3) if total_ms else None,
        "downtime_ms": info.get("downtime"),
        "expected_downtime_last_ms": last_expected,
        "expected_over_measured": (round(last_expected / info["downtime"], 2)
                                   if last_expected and info.get("downtime") else None),
        "mbps": info.get("ram", {}).get("mbps"),
        "downtime_bytes": info.get("ram", {}).get("downtime-bytes"),
        "phases": info.get("x-migd-downtime-phases"),
        "error": info.get("error-desc"),
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default="random,zero,random-running")
    ap.add_argument("--max-bandwidth", default="0", help="bytes/s, K/M/G suffixes (default 0 = unlimited)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    memory = parse_size(args.memory)
    # in /dev/shm and private to this invocation: two benches must never share a RAM file
    tmp = Path(tempfile.mkdtemp(prefix="migd-bench-", dir="/dev/shm"))
    out: dict[str, list[dict[str, Any]]] = {}
    ok = True
    try:
        for case in args.cases.split(","):
            workload, random_ram = CASES[case]
            mem_path = random_file(tmp / "random.ram", memory) if random_ram else None
            out[case] = []
            for i in range(args.runs):
                run_dir = tmp / f"{case}-{i}"
                run_dir.mkdir()
                r = await one_run(run_dir, memory, workload, mem_path, parse_size(args.max_bandwidth))
                out[case].append(r)
                ok &= r["status"] == "completed"
                if not args.json:
                    print(f"{case} run {i + 1}: {r['status']} total={r['total_time_ms']} ms "
                          f"({r['gb_per_s']} GB/s) downtime={r['downtime_ms']} ms expected(last)="
                          f"{r['expected_downtime_last_ms']} ms ratio={r['expected_over_measured']} "
                          f"digest_equal={r['digest_equal']}")
                    print(f"  phases: {r['phases']}")
                    if r["error"]:
                        print(f"  error: {r['error']}")
            done = [r for r in out[case] if r["status"] == "completed"]
            if done and not args.json:
                print(f"{case}: median {statistics.median(r['gb_per_s'] for r in done)} GB/s, "
                      f"median downtime {statistics.median(r['downtime_ms'] for r in done)} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"memory": memory, "cases": out}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
