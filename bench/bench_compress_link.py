#!/usr/bin/env python3
"""multifd compression over a throttled link: none / zstd / zlib through a 1 Gbit/s token bucket.

The fault bed of tests/netfault.py: the source migd runs in one network namespace, the destination
(-S) in another, joined by a veth pair shaped on both ends with ``tc qdisc ... tbf rate 1gbit``. The
source's guest RAM is a /dev/shm file of half-compressible pages (random bytes, the last ``--compress``
of every page one repeated byte, as the ``random,compress=R`` workload writes them), the guest is idle
(-S), multifd with ``--channels`` channels and ``max-bandwidth 0`` (the link is the limit). For each
method: GB/s of guest RAM (size / the source's total-time), bytes on the wire (``ram.transferred``,
and what the source's veth end really sent, from its tx counter: payload plus TCP/IP headers), CPU
seconds per GiB of each process (/proc), downtime, and whether the RAM digests are equal. Needs root,
``ip`` and ``tc``; prints why and exits 0 where namespaces cannot be made.

    sudo python3 bench/bench_compress_link.py [--size 1G] [--rate 1gbit] [--channels 2]
                                              [--compression none zstd zlib] [--compress 0.5] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_multifd import ram_file  # noqa: E402
from bench_throughput import cpu_seconds  # noqa: E402
from helpers import Migd  # noqa: E402
from netfault import ADDR_B, NetFaultError, NetPair, missing_tools, unavailable  # noqa: E402

from migd.units import parse_size  # noqa: E402

ENDED = ("completed", "failed", "cancelled")


def wait_ended(m: Migd, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = m.cmd("query-migrate")
        if info.get("status") in ENDED:
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"{m.name}: migration did not end in {timeout} s")
        time.sleep(0.02)


def tx_bytes(net: NetPair, side: str) -> int:
    """Bytes the veth end of ``side`` has sent (its kernel counter)."""
    out = net.ip(side, "-s", "-j", "link", "show", "dev", net.dev[side]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def one_run(work: Path, size: int, rate: str, channels: int, method: str, compress: float) -> dict[str, Any]:
    net = NetPair().create()
    started: list[Migd] = []
    tag = f"{method}-{time.monotonic_ns()}"
    try:
        # a 1 Gbit/s bucket needs a burst of at least rate / HZ (~0.5 MB at HZ 250) or it cannot reach its rate
        net.rate(rate, burst="1mb", latency="50ms")
        mem = f"{size >> 20}M"
        src = Migd(work, f"src-{tag}", "-m", mem, "-S", "--mem-path", str(ram_file(size, compress)),
                   prefix=net.prefix("a"))
        started.append(src)
        dst = Migd(work, f"dst-{tag}", "-m", mem, "-S", "--incoming", f"tcp:{ADDR_B}:0", prefix=net.prefix("b"))
        started.append(dst)
        for m in (src, dst):
            m.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            m.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": method})
        port = int(dst.cmd("query-migrate")["socket-address"][0]["port"])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        time.sleep(1.0)  # the destination prefaults its RAM meanwhile, as a waiting one has
        cpu0 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        tx0 = tx_bytes(net, "a")
        src.cmd("migrate", uri=f"tcp:{ADDR_B}:{port}")
        info = wait_ended(src)
        cpu1 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        tx1 = tx_bytes(net, "a")
        if info["status"] != "completed":
            raise RuntimeError(f"{method}: migration {info['status']}: {info.get('error-desc')}")
        wait_ended(dst)
        gib = size / (1 << 30)
        return {"method": method, "gbps": size / (info["total-time"] / 1000) / 1e9,
                "total_ms": info["total-time"], "downtime_ms": info.get("downtime"),
                "expected_ms": info.get("x-migd-expected-downtime"),
                "wire_mb": info["ram"]["transferred"] / 1e6, "veth_mb": (tx1 - tx0) / 1e6,
                "src_cpu": (cpu1[0] - cpu0[0]) / gib, "dst_cpu": (cpu1[1] - cpu0[1]) / gib,
                "digest_equal": src.cmd("x-migd-ram-digest") == dst.cmd("x-migd-ram-digest")}
    finally:
        for m in started:
            m.kill()
        net.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rate", default="1gbit", help="tbf rate on both veth ends")
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--compression", nargs="+", default=["none", "zstd", "zlib"])
    ap.add_argument("--compress", type=float, default=0.5, help="compressible fraction of each page")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    reason = unavailable() or missing_tools("tc")
    if reason:
        print(f"bench_compress_link skipped: {reason}")
        return 0
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="migd-compress-link-"))
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.compression}
    print(f"{args.size} RAM, pages {args.compress:g} compressible, idle guest, multifd {args.channels}, "
          f"tbf {args.rate}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        for _ in range(args.repeat):
            for method in args.compression:
                try:
                    r = one_run(work, size, args.rate, args.channels, method, args.compress)
                except NetFaultError as exc:
                    print(f"bench_compress_link skipped: {exc}")
                    return 0
                runs[method].append(r)
                print(f"  {method}: {r}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| compression | GB/s (median) | total ms | downtime ms | ram.transferred MB | veth tx MB | "
          "CPU s/GiB src / dst | digest |")
    print("|---|---|---|---|---|---|---|---|")
    for method, rs in runs.items():
        med = statistics.median(r["gbps"] for r in rs)
        r = min(rs, key=lambda x: abs(x["gbps"] - med))
        print(f"| {method} | {med:.3f} | {r['total_ms']} | {r['downtime_ms']} | {r['wire_mb']:.0f} | "
              f"{r['veth_mb']:.0f} | {r['src_cpu']:.2f} / {r['dst_cpu']:.2f} | "
              f"{'equal' if all(x['digest_equal'] for x in rs) else 'DIFFERENT'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
