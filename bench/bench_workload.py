"""Workload accuracy and machine footprint: does ``random,rate=R`` really dirty R bytes/s?

For each requested rate per vCPU and each vCPU count, a real Machine runs the ``random`` workload
for a few seconds and the achieved rate (x-migd-query-workload's figure: bytes written over the last
2 s of wall time) is compared with the request. Also reports the RSS of an idle 1 GiB machine (in a
fresh process) and the cost of an x-migd-ram-digest of 1 GiB.

    python3 bench/bench_workload.py [--seconds 4] [--rates 16M,64M,100M,256M] [--smp 1,2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from migd.config import MachineConfig  # noqa: E402
from migd.events import EventSink  # noqa: E402
from migd.machine import Machine  # noqa: E402
from migd.machine.runstate import RunStateMachine  # noqa: E402
from migd.machine.workloads import format_size, parse_size  # noqa: E402

GiB = 1 << 30


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def run_rate(per_vcpu: int, smp: int, seconds: float) -> dict[str, float]:
    total = per_vcpu * smp
    m = Machine(MachineConfig(memory=GiB, smp=smp, workload=f"random,rate={format_size(total)}"),
                RunStateMachine(), EventSink())
    m.start()
    time.sleep(1.0)  # warm-up: the first second faults RAM in
    c0, t0 = cpu_seconds(), time.monotonic()
    b0 = sum(v.stats.bytes_written for v in m.vcpus)
    time.sleep(seconds)
    dt = time.monotonic() - t0
    b1 = sum(v.stats.bytes_written for v in m.vcpus)
    info = m.workload_info()
    cpu = cpu_seconds() - c0
    m.shutdown()
    avg = (b1 - b0) / dt
    return {"smp": smp, "requested_per_vcpu": per_vcpu, "requested": total, "achieved_avg": avg,
            "achieved_query": info["achieved-rate"], "ratio": avg / total,
            "largest_stall_ms": info["largest-stall-ms"], "cpu_pct": 100 * cpu / dt}


_RSS_CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine import Machine
from migd.machine.runstate import RunStateMachine
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS'))
base = rss()
m = Machine(MachineConfig(memory=1 << 30, smp=2), RunStateMachine(), EventSink())
m.start()
time.sleep(1.0)
print(base, rss())
m.shutdown()
"""


def idle_rss() -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(Path(__file__).resolve().parent.parent)],
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return int(out[0]), int(out[1])


def digest_time() -> dict[str, float]:
    m = Machine(MachineConfig(memory=GiB, smp=1, workload="idle"), RunStateMachine(), EventSink())
    t0 = time.monotonic()
    m.ram_digest()
    untouched = time.monotonic() - t0
    m.ram.get("ram0").buf[:] = 1  # every page resident and non-zero
    t0 = time.monotonic()
    m.ram_digest()
    full = time.monotonic() - t0
    m.shutdown()
    return {"untouched_s": untouched, "resident_s": full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rates", default="16M,64M,100M,256M", help="requested bytes/s per vCPU")
    ap.add_argument("--smp", default="1,2")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    results = []
    print(f"{'smp':>3} {'per vCPU':>9} {'requested':>10} {'achieved':>10} {'ratio':>6} {'stall ms':>9} {'cpu %':>6}")
    for smp in [int(s) for s in a.smp.split(",")]:
        for rate in [parse_size(r, "rate") for r in a.rates.split(",")]:
            r = run_rate(rate, smp, a.seconds)
            results.append(r)
            print(f"{smp:>3} {format_size(rate):>9} {r['requested'] / 2**20:>8.1f}Mi {r['achieved_avg'] / 2**20:>8.1f}Mi "
                  f"{r['ratio']:>6.3f} {r['largest_stall_ms']:>9.1f} {r['cpu_pct']:>6.1f}")
    base, rss = idle_rss()
    print(f"idle 1 GiB machine, 2 vCPUs: RSS {rss / 2**20:.1f} MiB (interpreter + imports before the machine: "
          f"{base / 2**20:.1f} MiB, machine adds {(rss - base) / 2**20:.1f} MiB)")
    d = digest_time()
    print(f"x-migd-ram-digest of 1 GiB: {d['untouched_s'] * 1000:.0f} ms untouched, "
          f"{d['resident_s'] * 1000:.0f} ms resident")
    if a.json:
        Path(a.json).write_text(json.dumps({"rates": results, "idle_rss": {"before": base, "after": rss},
                                            "digest": d}, indent=2))


if __name__ == "__main__":
    main()
