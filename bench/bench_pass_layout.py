"""A pass of the same bytes in runs of different lengths: what a run of pages costs each end.

The switch-over policy predicts a final pass from windows and LOAD_PACE spans measured on the live
rounds, whose pages lie in other runs than the final pass's (docs/SWITCHOVER.md §1, ``on_layout``):
it needs the cost of a run beyond its bytes, on each side, and fits it from the migration's own
windows and spans — until they allow a fit it counts on ``policy.PRIOR_RUN_S`` (source) and
``policy.DEST_PRIOR_RUN_S`` (destination). This bench measures both on this machine: ``--pages``
random-content pages of a 64 MiB block (``--block-mib``), sent as a final pass between migd peers (page runs,
checksum records, the vCPUs held paused, page references over the unix socket) to a forked
destination that loads them into prefaulted RAM and checks them, laid out in one run, in runs of
``k`` pages at random places (``--runs``), or uniformly at random. Each side's CPU time (the whole
process) is printed with the cost per run beyond the one-run pass of the same run of the bench, and
the pass's wall time, from the source's start to the destination's last load (both ends at once:
against the slower end's CPU, what the pipeline costs). ``--spread N`` instead sends N identical
passes of the first ``--runs`` layout from the same source RAM and prints each one's wall time: how
much the same final pass varies on this machine.

    python3 bench/bench_pass_layout.py [--pages 9760] [--runs 16 4 2] [--reps 3] [--block-mib 64] [--spread N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pageloop  # noqa: E402

from migd.machine.ram import RAMList  # noqa: E402
from migd.machine.vcpu import VCPUSet  # noqa: E402
from migd.migration.format import FEATURE_CHECKSUM, FEATURE_PAGE_RUNS  # noqa: E402
from migd.migration.policy import DEST_PRIOR_RUN_S, PRIOR_RUN_S  # noqa: E402
from migd.migration.ram import _run_count, prefault  # noqa: E402
from migd.migration.savevm import SaveVM, load_stream  # noqa: E402
from migd.migration.stats import MigrationStats  # noqa: E402
from migd.migration.stream import InStream, OutStream  # noqa: E402
from migd.transports.channel import SocketChannel  # noqa: E402

BLOCK = 64 << 20
NPAGES = BLOCK // 4096


def layout(kind: str, pages: int, seed: int = 1) -> np.ndarray:
    """Sorted page indices: ``one`` run, ``runK`` (runs of K pages at random places; neighbours may
    merge), or ``random`` (uniform)."""
    rng = np.random.default_rng(seed)
    if kind == "one":
        return np.arange(pages)
    if kind.startswith("run"):
        k = int(kind[3:])
        starts = rng.choice(NPAGES // k, pages // k, replace=False) * k
        return np.unique((starts[:, None] + np.arange(k)).ravel())
    return np.sort(rng.choice(NPAGES, pages, replace=False))


def destination(sock: socket.socket, idx: np.ndarray, want: bytes, result_w: int, ready_w: int) -> None:
    ram = RAMList()
    ram.add("ram0", BLOCK)
    prefault(ram).join()
    os.write(ready_w, b"r")
    cpu0 = time.process_time()
    load_stream(InStream(SocketChannel(sock)), bench_pageloop.Box(ram))
    loaded = time.monotonic()  # one clock for both processes (CLOCK_MONOTONIC)
    cpu = time.process_time() - cpu0
    block = ram.get("ram0")
    assert block is not None
    ok = block.pages[idx].tobytes() == want
    os.write(result_w, f"{cpu} {int(ok)} {loaded}\n".encode())


def source_ram() -> RAMList:
    src = RAMList()
    src.add("ram0", BLOCK)
    bench_pageloop.fill_random(src)
    return src


def one_pass(kind: str, pages: int, src: RAMList | None = None) -> dict[str, float]:
    """CPU seconds of each side for one pass of ``pages`` pages laid out as ``kind``, and its wall
    seconds; from ``src`` when given, else from new RAM of random content."""
    src = src or source_ram()
    block = src.get("ram0")
    assert block is not None
    idx = layout(kind, pages)
    a, b = socket.socketpair()
    want = block.pages[idx].tobytes()
    dest = bench_pageloop.ForkedDestination(
        a, b, lambda sock, ready_w, result_w: destination(sock, idx, want, result_w, ready_w))
    out = OutStream(SocketChannel(a))
    out.set_rate_limit(0)
    vcpus = VCPUSet(1)
    vcpus.start()  # paused: held, as in the final pass
    sv = SaveVM(bench_pageloop.Box(src, vcpus), MigrationStats(), return_path=False,
                features=FEATURE_CHECKSUM | FEATURE_PAGE_RUNS)
    sv.ram.page_runs = lambda: True
    try:
        sv.save_header(out)
        sv.save_setup(out)
        out.flush()
        tracked = sv.ram._tracked[0]  # the setup marked every page: only the layout's stay dirty
        tracked.bmap[:] = False
        tracked.bmap[idx] = True
        sv.ram.stats.dirty_pages = idx.size
        cpu0, start = time.process_time(), time.monotonic()
        sv.save_complete_precopy(out)
        out.flush()
        send_cpu = time.process_time() - cpu0
    finally:
        sv.cleanup()
        vcpus.shutdown()
    recv_cpu, ok, loaded = dest.result()
    if ok != b"1":
        raise RuntimeError(f"{kind}: the destination's pages differ from the source's")
    return {"pages": idx.size, "runs": _run_count(idx), "send": send_cpu, "recv": float(recv_cpu),
            "wall": float(loaded) - start}


def spread(kind: str, pages: int, passes: int) -> None:
    """``passes`` identical passes from one source RAM: each one's wall ms, in order."""
    src = source_ram()
    walls = [one_pass(kind, pages, src)["wall"] * 1e3 for _ in range(passes)]
    print(f"{passes} identical passes of {pages} pages ({pages * 4096 / 1e6:.0f} MB, {kind}) of a "
          f"{BLOCK >> 20} MiB block, wall ms in order: {' '.join(f'{w:.1f}' for w in walls)}")
    print(f"min {min(walls):.1f}  median {statistics.median(walls):.1f}  max {max(walls):.1f}  "
          f"(max/median {max(walls) / statistics.median(walls):.2f}, median/min "
          f"{statistics.median(walls) / min(walls):.2f})", flush=True)


def main() -> None:
    global BLOCK, NPAGES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=9760, help="pages per pass (9760: 40 MB, the 200M/64M/128M case)")
    ap.add_argument("--runs", type=int, nargs="+", default=[16, 4, 2], help="run lengths besides one run and random")
    ap.add_argument("--reps", type=int, default=3, help="passes of each layout, alternating")
    ap.add_argument("--block-mib", type=int, default=64,
                    help="the RAM block's size (512 with --pages 51200: the 64M over 32 MiB/s case's 210 MB final pass)")
    ap.add_argument("--spread", type=int, default=0, metavar="N",
                    help="N identical passes of the first --runs layout, each one's wall time")
    args = ap.parse_args()
    BLOCK, NPAGES = args.block_mib << 20, (args.block_mib << 20) // 4096
    if args.spread:
        spread(f"run{args.runs[0]}", args.pages, args.spread)
        return
    kinds = ["one", *(f"run{k}" for k in args.runs), "random"]
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.reps):
        for kind in kinds:
            results[kind].append(one_pass(kind, args.pages))
    print(f"{args.pages} pages ({args.pages * 4096 / 1e6:.0f} MB) of a {BLOCK >> 20} MiB block per pass, "
          f"{args.reps} passes of each layout alternating; CPU ms per side, median; per run: beyond the "
          f"one-run pass (priors: source {PRIOR_RUN_S * 1e6:.0f} µs, destination {DEST_PRIOR_RUN_S * 1e6:.0f} µs)")
    base = {side: statistics.median(r[side] for r in results["one"]) for side in ("send", "recv")}
    for kind in kinds:
        rs = results[kind]
        runs = statistics.median(r["runs"] for r in rs)
        send, recv, wall = (statistics.median(r[side] for r in rs) for side in ("send", "recv", "wall"))
        per = ("" if kind == "one" else
               f"   per run: source {(send - base['send']) / (runs - 1) * 1e6:5.1f} µs, "
               f"destination {(recv - base['recv']) / (runs - 1) * 1e6:5.1f} µs")
        print(f"{kind:7} {runs:6.0f} runs ({rs[0]['pages'] / runs:7.1f} pages a run)  source {send * 1e3:6.1f} ms  "
              f"destination {recv * 1e3:6.1f} ms  wall {wall * 1e3:6.1f} ms{per}", flush=True)


if __name__ == "__main__":
    main()
