#!/usr/bin/env python3
"""multifd throughput between two real migd processes: 1 GiB, 1 (no multifd) / 2 / 4 channels, with
and without compression, max-bandwidth 0 (or ``--bandwidth``: a slow link's stand-in, since the limit
counts wire bytes), paused-guest data plane (idle guest, RAM from a file).

The source's RAM is a /dev/shm file (``--mem-path``): random bytes, or with ``--compress R`` the last R
of every page one repeated byte (as the ``random,compress=R`` workload writes), so zstd/zlib have
something to gain. The destination waits with -S; its RAM digest is checked after every run. GB/s =
guest RAM bytes / the source's total-time; CPU seconds per GiB of each process from /proc.

    python3 bench/bench_multifd.py [--size 1G] [--channels 1 2 4] [--compression none zstd]
                                   [--compress 0.5] [--repeat 1] [--transport unix] [--bandwidth 0] [--zero]
                                   [--zero-copy] [--paused]

``--paused`` stops the source's guest first (``stop``): with one channel its pages then leave straight
from RAM (the vCPUs are held while they are hashed); a running guest's go through a staging copy.

``--zero-copy`` adds, for every multifd row without compression, a row with ``zero-copy-send`` on the
source (MSG_ZEROCOPY; tcp only: a unix socket refuses it, and on loopback the kernel copies anyway).
"""

from __future__ import annotations

import argparse
import atexit
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_throughput import SETTLE, Daemon, cpu_seconds, wait_done

from migd.units import parse_size

PAGE = 4096


def ram_file(size: int, compress: float) -> Path:
    """Random non-zero pages, the tail ``compress`` of each one repeated byte; removed at exit."""
    path = Path(f"/dev/shm/migd-multifd-{os.getpid()}-{size}-{compress}")
    if path.exists():
        return path
    atexit.register(path.unlink, missing_ok=True)
    rng = np.random.default_rng(4321)
    chunk_pages = (64 << 20) // PAGE
    tail = int(PAGE * compress)
    with open(path, "wb") as f:
        left = size // PAGE
        while left:
            n = min(left, chunk_pages)
            pages = rng.integers(1, 256, size=(n, PAGE), dtype=np.uint8)
            if tail:
                pages[:, PAGE - tail :] = 0x5A
            f.write(pages.tobytes())
            left -= n
    return path


def run_once(workdir: Path, size: int, channels: int, compression: str, compress: float,
             transport: str, bandwidth: int = 0, zero: bool = False, zero_copy: bool = False,
             paused: bool = False) -> dict[str, Any]:
    mem = f"{size >> 20}M"
    incoming = f"unix:{workdir}/mig.sock" if transport == "unix" else "tcp:127.0.0.1:0"
    backing = [] if zero else ["--mem-path", str(ram_file(size, compress))]
    src = Daemon(workdir, "src", "-m", mem, *backing)
    dst = Daemon(workdir, "dst", "-m", mem, "-S", "--incoming", incoming)
    try:
        for d in (src, dst):
            if channels > 1:
                d.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                d.cmd("migrate-set-parameters", **{"multifd-channels": channels,
                                                    "multifd-compression": compression})
        if paused:
            src.cmd("stop")
        if zero_copy:
            src.cmd("migrate-set-capabilities", capabilities=[{"capability": "zero-copy-send", "state": True}])
        deadline = time.monotonic() + 60
        while "socket-address" not in (info := dst.cmd("query-migrate")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"destination is not listening: {info}")
            time.sleep(0.01)
        time.sleep(SETTLE)  # the destination prefaults its RAM meanwhile, as a waiting one has
        uri = incoming if transport == "unix" else f"tcp:127.0.0.1:{info['socket-address'][0]['port']}"
        src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        cpu0 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        src.cmd("migrate", uri=uri)
        info = wait_done(src)
        cpu1 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
        wait_done(dst)
        same = src.cmd("x-migd-ram-digest") == dst.cmd("x-migd-ram-digest")
        gib = size / (1 << 30)
        return {"gbps": size / (info["total-time"] / 1000) / 1e9, "total_ms": info["total-time"], "downtime_ms": info.get("downtime"),
                "wire_mb": info["ram"]["transferred"] / 1e6, "digest_equal": same,
                "missed": info["ram"].get("dirty-sync-missed-zero-copy", 0),
                "src_cpu": (cpu1[0] - cpu0[0]) / gib, "dst_cpu": (cpu1[1] - cpu0[1]) / gib}
    finally:
        src.stop()
        dst.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--compression", nargs="+", default=["none", "zstd"])
    ap.add_argument("--compress", type=float, default=0.5, help="compressible fraction of each page")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--transport", default="unix", choices=["unix", "tcp"])
    ap.add_argument("--zero", action="store_true", help="untouched (zero) guest RAM instead of the file")
    ap.add_argument("--bandwidth", default="0", help="max-bandwidth (wire bytes/s): a slow link's stand-in")
    ap.add_argument("--zero-copy", action="store_true", help="also multifd rows with zero-copy-send (tcp)")
    ap.add_argument("--paused", action="store_true", help="stop the source's guest before migrating")
    args = ap.parse_args()
    size = parse_size(args.size)
    bandwidth = parse_size(args.bandwidth)
    workdir = Path(f"/tmp/migd-bench-multifd-{os.getpid()}")
    workdir.mkdir(parents=True, exist_ok=True)
    what = "untouched RAM" if args.zero else f"pages {args.compress:g} compressible"
    what += ", source paused" if args.paused else ", source running (idle)"
    print(f"{args.size} RAM, {what}, {args.transport}, max-bandwidth {args.bandwidth}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| channels | compression | GB/s (median) | total ms | downtime ms | wire MB | CPU s/GiB src / dst | digest |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(c, comp, False) for c in args.channels for comp in (args.compression if c > 1 else ["none"])]
    if args.zero_copy:
        rows += [(c, "none", True) for c in args.channels if c > 1 and "none" in args.compression]
    for channels, compression, zc in rows:
        runs = [run_once(workdir, size, channels, compression, args.compress, args.transport, bandwidth, args.zero,
                         zc, args.paused) for _ in range(args.repeat)]
        med = statistics.median(r["gbps"] for r in runs)
        r = min(runs, key=lambda x: abs(x["gbps"] - med))
        label = str(channels) if channels > 1 else "1 (no multifd)"
        if zc:
            label += f" zero-copy-send (missed {r['missed']})"
        print(f"| {label} | {compression} | {med:.2f} | {r['total_ms']} | {r['downtime_ms']} | {r['wire_mb']:.0f} | "
              f"{r['src_cpu']:.2f} / {r['dst_cpu']:.2f} | {'equal' if all(x['digest_equal'] for x in runs) else 'DIFFERENT'} |",
              flush=True)


if __name__ == "__main__":
    main()
