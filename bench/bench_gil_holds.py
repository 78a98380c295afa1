#!/usr/bin/env python3
"""Which calls of the page paths keep the GIL, and for how long, at the sizes migd uses.

Each operation runs on a worker thread while a probe thread wakes every 0.1 ms and stamps the time;
the longest gap between two stamps while the operation ran is how long the probe could not get the
GIL (or a CPU). Whether a call keeps the GIL is judged on a 10-100x larger instance of it (a gap
most of its duration), its cost at the size migd uses is printed beside. Median over
``--reps`` repetitions.

    python3 bench/bench_gil_holds.py [--reps 7] [--ram 1G]

Rows marked ``old`` are what migd did before the fixes of issue 13 item 4 (kept for comparison).
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migd.cli  # noqa: E402, F401 - what a daemon imports: the objects a full collection walks
from migd.migration.multifd import _be_offsets, _split_zero  # noqa: E402
from migd.migration.stream import copy_bytes  # noqa: E402

TICK = 0.0001


def measure(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median duration, median longest probe gap during the call), in ms."""
    stamps: list[float] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            time.sleep(TICK)
            stamps.append(time.perf_counter())

    th = threading.Thread(target=prober, daemon=True)
    th.start()
    durs, gaps = [], []
    result: list[tuple[float, float]] = []

    def worker() -> None:
        t0 = time.perf_counter()
        fn()
        result.append((t0, time.perf_counter()))

    for _ in range(reps):
        time.sleep(0.005)
        w = threading.Thread(target=worker)
        w.start()
        w.join()
        t0, t1 = result.pop()
        inside = [t0] + [s for s in list(stamps) if t0 < s < t1] + [t1]
        durs.append((t1 - t0) * 1000)
        gaps.append(max(b - a for a, b in zip(inside, inside[1:], strict=False)) * 1000)
        stamps.clear()
    stop.set()
    th.join()
    return statistics.median(durs), statistics.median(gaps)


def classify(fn: Callable[[], object], reps: int) -> str:
    """Whether a call keeps the GIL, judged on a large instance (tens of ms): the probe's longest
    gap against the call's duration. A short call cannot be judged on a loaded host (the probe may
    simply get no CPU for a millisecond)."""
    d, g = measure(fn, reps)
    if d < 1.0:
        return f"too short to matter ({d:.3f} ms even when 10-100x larger)"
    return f"KEEPS the GIL ({g:.1f} of {d:.1f} ms)" if g > 0.8 * d else f"releases it (longest gap {g:.2f} of {d:.1f} ms)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ram", default="1G", help="guest RAM size the bitmap rows are sized for (1G, 64G)")
    args = ap.parse_args()
    ram = int(args.ram[:-1]) << {"M": 20, "G": 30}[args.ram[-1].upper()]
    npages = ram // 4096
    big = 1 << 24  # bitmap entries of the large instance (a 64 GiB guest)

    guest = mmap.mmap(-1, 96 << 20)
    pages = np.frombuffer(guest, dtype=np.uint8).reshape(-1, 4096)
    pages[:] = np.random.default_rng(1).integers(1, 256, pages.shape, dtype=np.uint8)
    words = pages.view(np.uint64)
    stage = np.empty((512, 4104), dtype=np.uint8)
    stage_big = np.empty((16384, 4104), dtype=np.uint8)
    rng = np.random.default_rng(2)
    bmap, taken = rng.random(npages) < 0.5, rng.random(npages) < 0.1
    bmap_big, taken_big = rng.random(big) < 0.5, rng.random(big) < 0.1
    h = xxhash.xxh3_64()
    src4 = memoryview(rng.integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    dst4 = memoryview(mmap.mmap(-1, 4 << 20))
    src64 = memoryview(rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes())
    dst64 = memoryview(mmap.mmap(-1, 64 << 20))
    doc = {"devices": [{"name": f"dev{i}", "fields": [{"name": "f", "size": 8}] * 8} for i in range(40)]}
    doc_big = {"devices": doc["devices"] * 50}

    def merge(b: np.ndarray, t: np.ndarray) -> None:
        np.count_nonzero(t & ~b)
        np.logical_or(b, t, out=b)

    rows: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("source: stage copy, 512 pages (numpy)", lambda: stage[:, 8:].__setitem__(slice(None), pages[:512]),
         lambda: stage_big[:, 8:].__setitem__(slice(None), pages[:16384])),
        ("source: xxh3 over a 2 MiB batch", lambda: h.update(stage), lambda: h.update(src64)),
        ("source: zero filter, first/last word, 512 pages", lambda: (words[:512, 0] == 0) & (words[:512, -1] == 0),
         lambda: (words[:, 0] == 0) & (words[:, -1] == 0)),
        ("multifd sender: zero split, 1024-page batch", lambda: _split_zero(words, np.arange(1024)),
         lambda: _split_zero(words, np.arange(words.shape[0]))),
        ("multifd sender: be64 offsets, 1024-page batch", lambda: _be_offsets(np.arange(1024)),
         lambda: _be_offsets(np.arange(1 << 24))),
        (f"sync: bitmap merge, {npages} pages", lambda: merge(bmap, taken), lambda: merge(bmap_big, taken_big)),
        (f"sync: take (copy + fill), {npages} pages", lambda: (taken.copy(), taken.fill(False)),
         lambda: (taken_big.copy(), taken_big.fill(False))),
        (f"scan: flatnonzero, {npages} pages", lambda: np.flatnonzero(bmap), lambda: np.flatnonzero(bmap_big)),
        ("dest: 1024 pages into RAM (numpy)", lambda: pages[1024:2048].__setitem__(slice(None), pages[4096:5120]),
         lambda: pages[:12288].__setitem__(slice(None), pages[12288:24576])),
        ("old dest: InStream buffer, bytearray(4 MiB)", lambda: bytearray(4 << 20), lambda: bytearray(64 << 20)),
        ("dest: InStream buffer, mmap(4 MiB)", lambda: mmap.mmap(-1, 4 << 20), lambda: mmap.mmap(-1, 64 << 20)),
        ("old dest: 4 MiB memoryview copy (read_into)", lambda: dst4.__setitem__(slice(None), src4),
         lambda: dst64.__setitem__(slice(None), src64)),
        ("dest: 4 MiB copy_bytes (read_into)", lambda: copy_bytes(dst4, src4), lambda: copy_bytes(dst64, src64)),
        ("bytes() of 4 MiB (OutStream.put >= 64 KiB)", lambda: bytes(src4), lambda: bytes(src64)),
        ("json.dumps of a 40-device VMDESCRIPTION", lambda: json.dumps(doc), lambda: json.dumps(doc_big)),
    ]
    print(f"{'operation (at the size migd uses)':<52} {'takes':>9}  GIL (judged on a 10-100x larger call)")
    for name, fn, large in rows:
        d, _ = measure(fn, args.reps)
        print(f"{name:<52} {d:7.3f} ms  {classify(large, args.reps)}")
    # a full garbage collection over the import-time objects of a daemon, unfrozen and frozen
    gc.collect()
    d, g = measure(lambda: gc.collect(2), args.reps)
    print(f"{'old: full gc over the import-time objects':<52} {d:7.3f} ms  longest gap {g:.3f} ms")
    gc.freeze()
    d, g = measure(lambda: gc.collect(2), args.reps)
    print(f"{'full gc, import-time objects frozen (gcfreeze)':<52} {d:7.3f} ms  longest gap {g:.3f} ms")
    gc.unfreeze()
    return 0


if __name__ == "__main__":
    sys.exit(main())
