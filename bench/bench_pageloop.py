"""Page-loop benchmark: guest RAM through SaveVM -> unix socketpair (or TCP loopback) -> load_stream.

The source process saves a RAMList (random pages, or pages never touched) with max-bandwidth 0; the
destination process (forked, its RAM prefaulted before the clock starts, as migrate-incoming does)
loads it and verifies the bytes. Prints end-to-end GB/s and CPU seconds per GiB of each side.

    python3 bench/bench_pageloop.py                  # 1 GiB, random and untouched, 3 runs each
    python3 bench/bench_pageloop.py --size 256 --runs 5 --case random
    python3 bench/bench_pageloop.py --case random --modes staged runs-staged runs-held
    python3 bench/bench_pageloop.py --case random --modes runs-held --transport tcp

``--modes`` compares, in one run, how a stream with checksum records carries the pages: ``staged``
sends QEMU's PAGE records through a staging array, read by the loader through its buffer (what main
did always); ``runs-staged`` sends page runs (docs/FORMAT.md §3.4) from the staging copy (a running
guest), ``runs-held`` straight from RAM with the vCPUs held paused; the loader reads runs straight into
RAM. ``runs-copied`` is ``runs-held`` with the page references over the unix socket turned off
(``stream.SPLICE``): the kernel copies each run into the socket. ``plain`` (the default) is a stream
without migd's features. ``--transport tcp`` runs the same over a TCP loopback connection (TCP_NODELAY,
as the daemons' sockets), where page runs are always copied into the socket.

Targets (see shared/reference/page-loop-measurements.md): >= 2.5 GB/s for random pages, <= 60 ms for
1 GiB of untouched RAM. The machine is noisy: compare medians, and CPU s/GiB, side by side.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from migd.machine.ram import RAMList  # noqa: E402
from migd.machine.vcpu import VCPUSet  # noqa: E402
from migd.migration import stream  # noqa: E402
from migd.migration.format import FEATURE_CHECKSUM, FEATURE_PAGE_RUNS  # noqa: E402
from migd.migration.ram import prefault  # noqa: E402
from migd.migration.savevm import SaveVM, load_stream  # noqa: E402
from migd.migration.stats import MigrationStats  # noqa: E402
from migd.migration.stream import InStream, OutStream  # noqa: E402
from migd.transports.channel import SocketChannel  # noqa: E402

GiB = 1 << 30


class Box:
    def __init__(self, ram: RAMList, vcpus: VCPUSet | None = None) -> None:
        self.ram = ram
        self.vcpus = vcpus  # held paused (mode held): pages leave straight from RAM

    def devices(self) -> list:
        return []


def fill_random(ram: RAMList, seed: int = 1) -> None:
    buf = ram.get("ram0").buf.view(np.uint64)
    rng = np.random.default_rng(seed)
    step = 16 << 20
    for i in range(0, buf.size, step):
        buf[i : i + step] = rng.integers(0, 1 << 63, min(step, buf.size - i), dtype=np.uint64)


def destination(sock: socket.socket, size: int, ready_w: int, result_w: int, expect_digest: bytes) -> None:
    ram = RAMList()
    ram.add("ram0", size)
    prefault(ram).join()
    os.write(ready_w, b"r")
    cpu0 = time.process_time()
    load_stream(InStream(SocketChannel(sock)), Box(ram))
    end = time.monotonic()
    cpu = time.process_time() - cpu0
    ok = digest(ram) == expect_digest
    os.write(result_w, f"{end} {cpu} {int(ok)}\n".encode())


def digest(ram: RAMList) -> bytes:
    import hashlib

    return hashlib.blake2b(ram.get("ram0").buf, digest_size=16).digest()


MODES = ("plain", "staged", "runs-staged", "runs-held", "runs-copied")


def socket_pair(transport: str) -> tuple[socket.socket, socket.socket]:
    """A connected pair: a unix socketpair, or both ends of a TCP loopback connection."""
    if transport == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s_ in (a, b):
        s_.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


class ForkedDestination:
    """A destination process forked with one end of a connected pair: in the child,
    ``load(sock, ready_w, result_w)`` writes one byte to ``ready_w`` once it may be sent to and one
    result line to ``result_w``; the parent returns from the constructor once the child is ready."""

    def __init__(self, a: socket.socket, b: socket.socket,
                 load: Callable[[socket.socket, int, int], None]) -> None:
        self.sock = a
        ready_r, ready_w = os.pipe()
        self.result_r, result_w = os.pipe()
        self._fds = (ready_r, ready_w, self.result_r, result_w)
        self.pid = os.fork()
        if self.pid == 0:
            a.close()
            code = 0
            try:
                load(b, ready_w, result_w)
            except BaseException:  # noqa: BLE001 - reported, the child exits
                import traceback

                traceback.print_exc()
                code = 1
            os._exit(code)
        b.close()
        os.read(ready_r, 1)

    def result(self) -> list[bytes]:
        """End the stream, wait for the child and return its result line's fields (RuntimeError if
        it wrote none)."""
        self.sock.shutdown(socket.SHUT_WR)
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.result_r, 100)
            if not chunk:
                break
            line += chunk
        _, status = os.waitpid(self.pid, 0)
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        if not line:
            raise RuntimeError(f"destination failed (status {status})")
        return line.split()


def run_once(case: str, size: int, mode: str = "plain", transport: str = "unix") -> dict[str, float]:
    src = RAMList()
    src.add("ram0", size)
    if case == "random":
        fill_random(src)
    want = digest(src) if case == "random" else digest_of_zero(size)
    a, b = socket_pair(transport)
    dest = ForkedDestination(a, b, lambda sock, ready_w, result_w: destination(sock, size, ready_w, result_w, want))
    f = OutStream(SocketChannel(a))
    f.set_rate_limit(0)
    features = 0 if mode == "plain" else FEATURE_CHECKSUM | (FEATURE_PAGE_RUNS if mode.startswith("runs") else 0)
    vcpus = None
    stream.SPLICE = mode != "runs-copied"
    if mode in ("runs-held", "runs-copied"):
        vcpus = VCPUSet(1)
        vcpus.start()  # paused: hold_paused() succeeds
    sv = SaveVM(Box(src, vcpus), MigrationStats(), return_path=False, features=features)
    if features & FEATURE_PAGE_RUNS:
        sv.ram.page_runs = lambda: True
    start = time.monotonic()
    cpu0 = time.process_time()
    sv.save_header(f)
    sv.save_setup(f)
    f.flush()
    while not sv.save_iterate(f):
        pass
    sv.save_complete_precopy(f)
    send_cpu = time.process_time() - cpu0
    sv.cleanup()
    if vcpus is not None:
        vcpus.shutdown()
    end_s, cpu_s, ok_s = dest.result()
    elapsed = float(end_s) - start
    gib = size / GiB
    return {"elapsed": elapsed, "gbps": size / elapsed / 1e9, "send_cpu": send_cpu / gib,
            "recv_cpu": float(cpu_s) / gib, "ok": float(ok_s), "bytes": float(f.transferred)}


def raw_ceiling(size: int, transport: str = "unix") -> float:
    """GB/s of plain 1 MiB sendall -> recv_into between two processes: the machine's ceiling now."""
    a, b = socket_pair(transport)
    for s_, opt, val in ((a, socket.SO_SNDBUF, 4 << 20), (b, socket.SO_RCVBUF, 8 << 20)):
        s_.setsockopt(socket.SOL_SOCKET, opt, val)
    pid = os.fork()
    if pid == 0:
        a.close()
        mv = memoryview(bytearray(4 << 20))
        while b.recv_into(mv):
            pass
        os._exit(0)
    b.close()
    chunk = bytes(1 << 20)
    start = time.monotonic()
    for _ in range(size >> 20):
        a.sendall(chunk)
    a.shutdown(socket.SHUT_WR)
    os.waitpid(pid, 0)
    elapsed = time.monotonic() - start
    a.close()
    return size / elapsed / 1e9


_zero_digest: dict[int, bytes] = {}


def digest_of_zero(size: int) -> bytes:
    if size not in _zero_digest:
        ram = RAMList()
        ram.add("ram0", size)
        ram.get("ram0").pages[:] = 0  # touched zeros hash like untouched ones
        _zero_digest[size] = digest(ram)
        ram.close()
    return _zero_digest[size]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="MiB of guest RAM (default 1024)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--case", choices=["random", "zero", "both"], default="both")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=["plain"])
    ap.add_argument("--transport", choices=["unix", "tcp"], default="unix",
                    help="a unix socketpair (default) or a TCP loopback connection")
    args = ap.parse_args()
    size = args.size << 20
    cases = ["random", "zero"] if args.case == "both" else [args.case]
    link = "unix socketpair" if args.transport == "unix" else "TCP loopback"
    print(f"page loop: {args.size} MiB, save -> {link} -> load, 2 processes, max-bandwidth 0")
    print(f"raw {link} ceiling right now (1 MiB sendall -> recv_into): "
          f"{raw_ceiling(size, args.transport):.2f} GB/s")
    for case in cases:
        by_mode: dict[str, list[dict[str, float]]] = {m: [] for m in args.modes}
        for _ in range(args.runs):  # modes alternate within each repetition: the load hits them alike
            for mode in args.modes:
                r = run_once(case, size, mode, args.transport)
                by_mode[mode].append(r)
                print(f"  {case:7s} {mode:11s} {r['elapsed'] * 1000:8.1f} ms  {r['gbps']:5.2f} GB/s  "
                      f"CPU s/GiB send {r['send_cpu']:.3f} recv {r['recv_cpu']:.3f}  "
                      f"stream {r['bytes'] / 1e6:.1f} MB  verified={'yes' if r['ok'] else 'NO'}", flush=True)
        for mode, results in by_mode.items():
            med = statistics.median(r["elapsed"] for r in results)
            print(f"{case} {mode}: median {med * 1000:.1f} ms = {size / med / 1e9:.2f} GB/s; "
                  f"CPU s/GiB send {statistics.median(r['send_cpu'] for r in results):.3f} "
                  f"recv {statistics.median(r['recv_cpu'] for r in results):.3f}")
            if not all(r["ok"] for r in results):
                sys.exit("destination RAM differs from the source")
    print(f"raw {link} ceiling after the runs: {raw_ceiling(size, args.transport):.2f} GB/s")


if __name__ == "__main__":
    main()
