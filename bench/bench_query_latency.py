#!/usr/bin/env python3
"""query-migrate latency over a whole migration, on a second QMP connection.

Two real migd processes (source and destination) on unix sockets; one QMP connection starts the
migration with ``max-bandwidth 0``, a second one sends ``query-migrate`` back to back until the migration
ends and records every round trip. migd answers from published counters, so the answers must keep coming
through the switch-over (QEMU's monitor is frozen for its whole downtime: max 290-350 ms there).

    python3 bench/bench_query_latency.py [--memory 1G] [--workload idle] [--runs 3] [--random-ram]

Prints p50/p99/max in ms per run, how many answers arrived while the status was ``device`` (the
switch-over), and the migration's own figures. Target: p99 < 10 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def random_file(path: Path, size: int) -> Path:
    """A file of random bytes (to back the source's RAM: every page must really be sent)."""
    if path.exists() and path.stat().st_size == size:
        return path
    chunk = 64 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return path


class Migd:
    """One migd process with its QMP socket."""

    def __init__(self, name: str, tmp: Path, args: list[str]) -> None:
        self.name = name
        self.qmp_path = tmp / f"{name}.qmp"
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        cmd = [sys.executable, "-m", "migd", "--name", name, "--qmp", f"unix:{self.qmp_path}", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    async def client(self, timeout: float = 30.0) -> QMPClient:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start (see {self.log.name})")
            await asyncio.sleep(0.05)
        client = QMPClient(self.name)
        await client.connect(str(self.qmp_path))
        return client

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def source_args(memory: int, workload: str, mem_path: Path | None) -> list[str]:
    args = ["-m", f"{memory >> 20}M", "--workload", workload]
    if mem_path is not None:
        args += ["--mem-path", str(mem_path)]
    return args


SETTLE = 2.0  # seconds: a destination prefaults its RAM right after it starts; migrations start later


async def start_pair(tmp: Path, memory: int, workload: str, mem_path: Path | None) -> tuple[Migd, Migd]:
    """Source and destination; the destination stays paused (-S) so its RAM can be compared."""
    src = Migd("src", tmp, source_args(memory, workload, mem_path))
    # configured like the source, as a QEMU destination is (a different workload spec would be built
    # at device-load time, inside the downtime)
    dst = Migd("dst", tmp, ["-m", f"{memory >> 20}M", "--workload", workload, "-S",
                            "--incoming", f"unix:{tmp}/mig.sock"])
    return src, dst


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_run(tmp: Path, memory: int, workload: str, mem_path: Path | None) -> dict[str, Any]:
    src, dst = await start_pair(tmp, memory, workload, mem_path)
    try:
        control, probe = await src.client(), await src.client()
        dclient = await dst.client()
        await control.execute("migrate-set-parameters", {"max-bandwidth": 0})
        await asyncio.sleep(SETTLE)
        samples: list[tuple[float, str]] = []

        async def poll() -> dict[str, Any]:
            while True:
                t0 = time.perf_counter()
                info = await probe.execute("query-migrate")
                samples.append(((time.perf_counter() - t0) * 1000, info.get("status", "none")))
                if info.get("status") in ("completed", "failed", "cancelled"):
                    return info

        poller = asyncio.create_task(poll())
        await control.execute("migrate", {"uri": f"unix:{tmp}/mig.sock"})
        info = await asyncio.wait_for(poller, 600)
        for c in (control, probe, dclient):
            await c.disconnect()
    finally:
        src.stop()
        dst.stop()
    lat = [s[0] for s in samples]
    return {
        "status": info["status"],
        "samples": len(lat),
        "p50_ms": round(statistics.median(lat), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "max_ms": round(max(lat), 3),
        "during_switchover": sum(1 for _, st in samples if st in ("device", "pre-switchover")),
        "max_during_switchover_ms": round(max((x for x, st in samples if st == "device"), default=0.0), 3),
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "mbps": info.get("ram", {}).get("mbps"),
        "phases": info.get("x-migd-downtime-phases"),
        "error": info.get("error-desc"),
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--workload", default="idle")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-ram", action="store_true",
                    help="back the source's RAM with a /dev/shm file of random bytes")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    memory = parse_size(args.memory)
    # in /dev/shm and private to this invocation: two benches must never share a RAM file
    tmp = Path(tempfile.mkdtemp(prefix="migd-bench-", dir="/dev/shm"))
    mem_path = random_file(tmp / "random.ram", memory) if args.random_ram else None
    results = []
    try:
        for i in range(args.runs):
            run_dir = tmp / f"run{i}"
            run_dir.mkdir()
            r = await one_run(run_dir, memory, args.workload, mem_path)
            results.append(r)
            if not args.json:
                print(f"run {i + 1}: {r['status']} samples={r['samples']} p50={r['p50_ms']} ms "
                      f"p99={r['p99_ms']} ms max={r['max_ms']} ms  answers during switch-over="
                      f"{r['during_switchover']} (max {r['max_during_switchover_ms']} ms)  "
                      f"total={r['total_time_ms']} ms downtime={r['downtime_ms']} ms mbps={r['mbps']}")
                if r["error"]:
                    print(f"  error: {r['error']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps({"memory": memory, "workload": args.workload, "runs": results}, indent=1))
    return 0 if all(r["status"] == "completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
