#!/usr/bin/env python3
"""Is XBZRLE worth it for migd? How many bytes a dirtying guest makes a migration send again, and how
well the deltas of those re-sent pages would encode.

XBZRLE (QEMU's ``xbzrle`` capability) keeps a cache of pages already sent and, for a page sent again,
sends the XOR delta against the cached copy as (zero-run, non-zero-run, bytes) triples, or the page
itself when the encoding would not be smaller. It can only gain on the bytes sent *again*, and only
where a re-written page differs from its old content in few bytes.

Part 1, per workload: a real migration (two migd, unix, -m --size, the source's RAM a private copy of
a random file so every page costs its full size, ``max-bandwidth`` --bandwidth as on a 1 Gbit/s link),
``ram.transferred`` against the guest size = the bytes sent again.
Part 2, per workload: the same source alone, its --mem-path file read twice --interval seconds apart
(about one pass at that bandwidth); every page that changed is a page a migration would re-send, and
its delta is encoded as XBZRLE would encode it (ULEB128 run lengths, here computed, not sent) and, for
comparison, the new page compressed with zstd level 1 as multifd zstd already sends it.

    python3 bench/bench_xbzrle_probe.py [--size 256M] [--bandwidth 125M] [--interval 2]
                                        [--workloads random,rate=64M counter,rate=4M ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zstandard
from bench_throughput import Daemon, random_file, wait_done

from migd.units import parse_size

PAGE = 4096
SAMPLE = 20000  # changed pages encoded at most (sampled evenly)


def _uleb_len(values: np.ndarray) -> np.ndarray:
    """Bytes of each value as ULEB128 (7 bits a byte)."""
    n = np.ones(values.shape, dtype=np.int64)
    v = values >> 7
    while v.any():
        n += v > 0
        v = v >> 7
    return n


def xbzrle_size(old: np.ndarray, new: np.ndarray) -> int:
    """Bytes of the XBZRLE encoding of ``new`` against ``old`` (one page; > PAGE means 'sent as is')."""
    nz = (old ^ new) != 0
    if not nz.any():
        return 0
    edges = np.flatnonzero(np.diff(np.concatenate(([False], nz, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]  # non-zero runs [start, end)
    zruns = starts - np.concatenate(([0], ends[:-1]))
    nzruns = ends - starts
    return int(_uleb_len(zruns).sum() + _uleb_len(nzruns).sum() + nzruns.sum())


def migration_resent(work: Path, size: int, workload: str, bandwidth: int, ram: Path) -> dict[str, Any]:
    copy = work / "src.ram"
    shutil.copyfile(ram, copy)
    mem = f"{size >> 20}M"
    src = Daemon(work, "src", "-m", mem, "--mem-path", str(copy), "--workload", workload)
    dst = Daemon(work, "dst", "-m", mem, "-S", "--incoming", f"unix:{work / 'mig.sock'}")
    try:
        time.sleep(1.0)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        src.cmd("migrate", uri=f"unix:{work / 'mig.sock'}")
        info = wait_done(src, 600)
        if info["status"] != "completed":
            raise RuntimeError(f"{workload}: {info['status']} {info.get('error-desc')}")
        ram_info = info["ram"]
        return {"total_ms": info["total-time"], "transferred": ram_info["transferred"],
                "resent": max(0, ram_info["transferred"] - size), "syncs": ram_info.get("dirty-sync-count")}
    finally:
        src.stop()
        dst.stop()
        copy.unlink(missing_ok=True)


def delta_probe(work: Path, size: int, workload: str, interval: float, ram: Path) -> dict[str, Any]:
    copy = work / "probe.ram"
    shutil.copyfile(ram, copy)
    src = Daemon(work, "probe", "-m", f"{size >> 20}M", "--mem-path", str(copy), "--workload", workload)
    try:
        time.sleep(1.0)  # the workload's first slices (its pool) are behind it
        before = np.fromfile(copy, dtype=np.uint8).reshape(-1, PAGE)
        time.sleep(interval)
        after = np.fromfile(copy, dtype=np.uint8).reshape(-1, PAGE)
    finally:
        src.stop()
        copy.unlink(missing_ok=True)
    changed = np.flatnonzero((before != after).any(axis=1))
    sample = changed[np.linspace(0, changed.size - 1, min(SAMPLE, changed.size)).astype(np.int64)] \
        if changed.size else changed
    zstd = zstandard.ZstdCompressor(level=1)
    raw = enc = zs = 0
    fits = 0
    for p in sample:
        size_x = xbzrle_size(before[p], after[p])
        z = len(zstd.compress(after[p].tobytes()))
        raw += PAGE
        if size_x < PAGE:
            fits += 1
        enc += min(size_x, PAGE)  # a delta that does not fit goes as the page itself
        zs += min(z, PAGE)
    k = max(1, sample.size)
    return {"changed_pages": int(changed.size), "changed_mb": changed.size * PAGE / 1e6,
            "xbzrle_ratio": enc / raw if raw else float("nan"), "fits": fits / k,
            "zstd_ratio": zs / raw if raw else float("nan")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--bandwidth", default="125M", help="max-bandwidth of the real migration (1 Gbit/s)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between the two RAM snapshots")
    ap.add_argument("--workloads", nargs="+",
                    default=["random,rate=64M", "random,rate=64M,compress=0.5", "counter,rate=4M"])
    args = ap.parse_args()
    size = parse_size(args.size)
    bandwidth = parse_size(args.bandwidth)
    ram = random_file(size)
    work = Path(tempfile.mkdtemp(prefix="migd-xbzrle-", dir="/dev/shm"))
    print(f"{args.size} guest, max-bandwidth {args.bandwidth}, snapshots {args.interval:g} s apart, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    try:
        for wl in args.workloads:
            m = migration_resent(work, size, wl, bandwidth, ram)
            d = delta_probe(work, size, wl, args.interval, ram)
            rows.append((wl, m, d))
            print(f"  {wl}: {m} {d}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| workload | total ms | sent MB | re-sent MB (share) | pages changed in interval | "
          "XBZRLE / raw of those | deltas that fit | zstd-1 / raw of those |")
    print("|---|---|---|---|---|---|---|---|")
    for wl, m, d in rows:
        print(f"| `{wl}` | {m['total_ms']} | {m['transferred'] / 1e6:.0f} | {m['resent'] / 1e6:.1f} "
              f"({m['resent'] / m['transferred']:.1%}) | {d['changed_pages']} ({d['changed_mb']:.1f} MB) | "
              f"{d['xbzrle_ratio']:.2f} | {d['fits']:.0%} | {d['zstd_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
