"""Final pass of scattered dirty pages: the source's CPU per page, short runs staged or sent from RAM.

A guest writing a hot set at random leaves its final pass scattered: runs of one or two pages. Each
page sent straight from RAM is two views (a RUN header and the page) that every layer of the stream
walks in Python; staged, the pages of short runs are one gathered array of QEMU's PAGE records. This
bench times the source's page loop (thread CPU, ``SaveVM.save_iterate`` until nothing is left) over a
socket whose far end only drains, for ``--pages`` random dirty pages of a 64 MiB block of random bytes,
with page runs and checksum records as between two migd peers and the vCPUs held paused as in the
final pass. Repetitions alternate ``ram.MIN_DIRECT_RUN`` between 1 (every run from RAM: the state
before) and the value under test, in one process, and the medians are printed side by side.

    python3 bench/bench_final_pass.py [--pages 560] [--reps 30] [--min-run 4] [--transport unix tcp]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pageloop  # noqa: E402

from migd.machine.ram import RAMList  # noqa: E402
from migd.machine.vcpu import VCPUSet  # noqa: E402
from migd.migration import ram as ramsave  # noqa: E402
from migd.migration.format import FEATURE_CHECKSUM, FEATURE_PAGE_RUNS  # noqa: E402
from migd.migration.savevm import SaveVM  # noqa: E402
from migd.migration.stats import MigrationStats  # noqa: E402
from migd.migration.stream import OutStream  # noqa: E402
from migd.transports.channel import SocketChannel  # noqa: E402

BLOCK = 64 << 20


def drain(sock: socket.socket) -> None:
    buf = bytearray(1 << 20)
    while sock.recv_into(buf):
        pass


def run(transport: str, pages: int, reps: int, min_run: int) -> tuple[list[float], list[float]]:
    """Per-page CPU µs of each repetition: (every run from RAM, short runs staged)."""
    ram = RAMList()
    ram.add("ram0", BLOCK)
    bench_pageloop.fill_random(ram)
    a, b = bench_pageloop.socket_pair(transport)
    reader = threading.Thread(target=drain, args=(b,), daemon=True)
    reader.start()
    out = OutStream(SocketChannel(a))
    out.set_rate_limit(0)
    vcpus = VCPUSet(1)
    vcpus.start()  # paused: held, as in the final pass
    saved = ramsave.MIN_DIRECT_RUN
    sv = SaveVM(bench_pageloop.Box(ram, vcpus), MigrationStats(), return_path=False,
                features=FEATURE_CHECKSUM | FEATURE_PAGE_RUNS)
    sv.ram.page_runs = lambda: True
    before: list[float] = []
    after: list[float] = []
    try:
        sv.save_header(out)
        sv.save_setup(out)
        out.flush()
        while not sv.save_iterate(out):  # the first pass
            pass
        block = ram.get("ram0")
        assert block is not None
        rng = np.random.default_rng(1)
        for rep in range(2 * reps):
            idx = np.sort(rng.choice(BLOCK // 4096, pages, replace=False))
            block.mark_dirty(idx)
            sv.pending_exact()
            ramsave.MIN_DIRECT_RUN = 1 if rep % 2 == 0 else min_run
            cpu = time.thread_time()
            while not sv.save_iterate(out):
                pass
            out.flush()
            (before if rep % 2 == 0 else after).append((time.thread_time() - cpu) * 1e6 / pages)
    finally:
        ramsave.MIN_DIRECT_RUN = saved
        sv.cleanup()
        vcpus.shutdown()
        a.close()
        reader.join(5)
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=560, help="dirty pages per final pass (560: 2.3 MB)")
    ap.add_argument("--reps", type=int, default=30, help="final passes of each kind")
    ap.add_argument("--min-run", type=int, default=ramsave.MIN_DIRECT_RUN)
    ap.add_argument("--transport", nargs="+", default=["unix", "tcp"], choices=["unix", "tcp"])
    args = ap.parse_args()
    print(f"{args.pages} random dirty pages of {BLOCK >> 20} MiB per final pass, {args.reps} passes of each "
          "kind alternating; source thread CPU µs per page, median (range)")
    for transport in args.transport:
        before, after = run(transport, args.pages, args.reps, args.min_run)
        print(f"{transport:5} every run from RAM {statistics.median(before):5.2f} ({min(before):.2f}-{max(before):.2f})"
              f"   runs < {args.min_run} staged {statistics.median(after):5.2f} ({min(after):.2f}-{max(after):.2f})",
              flush=True)


if __name__ == "__main__":
    main()
