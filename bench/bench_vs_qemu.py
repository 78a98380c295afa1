"""migd against QEMU 7.2, side by side in one run: 1 GiB random RAM, paused sources, max-bandwidth 0,
over unix and TCP loopback, one channel and multifd 2 and 4 on both, plus the raw socket ceiling.

Both sources map the same /dev/shm file of random non-zero bytes as guest RAM (QEMU:
``memory-backend-file,share=off`` on a q35/TCG machine with firmware only, started with -S so no guest
code runs and the RAM stays the file's bytes; migd: ``--mem-path`` of the same file, -S, so nothing
writes it). Both destinations start fresh (QEMU ``-incoming defer``, which multifd needs, then
``migrate-incoming``; migd ``--incoming``), get --settle seconds before ``migrate`` (migd prefaults its
RAM meanwhile, as a destination started ahead of the migration does; on a loaded host the bench then
also waits until the destination is idle), and the same capabilities and
``multifd-channels`` are set on both ends. Runs alternate QEMU and migd, per channel count, per
transport, and each repetition also measures the ceiling: a Python unix socketpair / TCP loopback
pair between two processes carrying the same 1 GiB (1 MiB ``sendall`` into ``recv_into``).

GB/s = guest RAM bytes / the source's ``total-time``, which the source measures itself; the bench polls
``query-migrate`` every --poll seconds (default 50 ms, as libvirt does without events: a 5 ms poll
cost migd's event loop ~0.1 CPU s/GiB on the source, taken from the migration). CPU s/GiB per side from /proc/PID/stat (user +
system of the whole process, from just before ``migrate`` to completion). Ratios: each row against
QEMU's median with the same channels, the best QEMU configuration's median on the same transport, and
the ceiling's median. ``--no-checksums`` adds migd with ``x-migd-checksums false`` (``migd-nock``: QEMU's
stream, neither side hashes), to show what migd's checksum records cost. Last,
1 GiB of untouched RAM (one channel, unix), target <= 60 ms for migd.

    python3 bench/bench_vs_qemu.py [--size 1G] [--repeat 1] [--transport unix tcp] [--channels 1 2 4]
                                   [--settle 1] [--poll 0.05] [--no-zero] [--no-checksums]

Needs ``qemu-system-x86_64`` (Debian: apt-get install qemu-system-x86).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_throughput import Daemon, connect_qmp, cpu_seconds, random_file, wait_done

from migd.units import parse_size

QEMU = shutil.which("qemu-system-x86_64")
CHUNK = 1 << 20  # bytes per send of the ceiling
ZERO_TARGET_MS = 60


def _mf_setup(cmd: Any, channels: int) -> None:
    """Same capability and parameter on either implementation's end (QMP ``cmd``)."""
    if channels > 1:
        cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        cmd("migrate-set-parameters", **{"multifd-channels": channels})


def _listening_uri(cmd: Any, transport: str, unix_path: Path) -> str:
    """The URI a destination listens on (tcp: its port from ``socket-address``)."""
    deadline = time.monotonic() + 60
    while "socket-address" not in (info := cmd("query-migrate")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"destination is not listening: {info}")
        time.sleep(0.01)
    if transport == "unix":
        return f"unix:{unix_path}"
    return f"tcp:127.0.0.1:{info['socket-address'][0]['port']}"


def _wait_idle(pid: int, limit: float = 60.0) -> None:
    """Until the process used < 10 ms of CPU in 100 ms (bounded): a migd destination prefaults its
    RAM after it starts listening, and on a loaded host that can outlast --settle and compete with
    the migration it is meant to precede."""
    deadline = time.monotonic() + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now - last < 0.01:
            return
        last = now


def _measure(src_cmd: Any, src_pid: int, dst_pid: int, uri: str, size: int, settle: float,
             poll: float) -> dict[str, Any]:
    src_cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    time.sleep(settle)  # a destination is started ahead of the migration, as in real use
    _wait_idle(dst_pid)
    cpu0 = cpu_seconds(src_pid), cpu_seconds(dst_pid)
    src_cmd("migrate", uri=uri)
    deadline = time.monotonic() + 300
    while True:
        info = src_cmd("query-migrate")
        status = info.get("status")
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}: {info.get('error-desc')}")
        if status == "completed" and info.get("total-time"):  # QEMU may say completed before its figures
            break
        if time.monotonic() > deadline:
            raise RuntimeError("migration did not finish in 300 s")
        time.sleep(poll)  # total-time is the source's own figure: the poll only costs CPU
    cpu1 = cpu_seconds(src_pid), cpu_seconds(dst_pid)
    gib = size / (1 << 30)
    total = info["total-time"]
    return {"total_ms": total, "downtime_ms": info.get("downtime", 0), "gbps": size / (total / 1000) / 1e9,
            "src_cpu": (cpu1[0] - cpu0[0]) / gib, "dst_cpu": (cpu1[1] - cpu0[1]) / gib}


class Qemu:
    """One qemu-system-x86_64 with a unix QMP socket."""

    def __init__(self, work: Path, name: str, size: int, extra: list[str]) -> None:
        self.qmp_path = work / f"q-{name}.qmp"
        self.log = open(work / f"q-{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        assert QEMU is not None
        self.proc = subprocess.Popen(
            [QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-nodefaults", "-display", "none",
             "-m", f"{size >> 20}M", "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = connect_qmp(self.proc, self.qmp_path, 30, f"QEMU {name} did not start; see {work}/q-{name}.log")

    def cmd(self, name: str, **args: Any) -> Any:
        return self.qmp.cmd(name, **args)

    def stop(self) -> None:
        try:
            self.qmp.close()
        except (OSError, EOFError):  # the monitor may be gone already
            pass
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        self.qmp_path.unlink(missing_ok=True)


def run_qemu(work: Path, ram: Path | None, size: int, transport: str, channels: int, settle: float,
             poll: float) -> dict[str, Any]:
    mib = size >> 20
    if ram is not None:
        backend = ["-object", f"memory-backend-file,id=mem0,size={mib}M,mem-path={ram},share=off"]
    else:
        backend = ["-object", f"memory-backend-ram,id=mem0,size={mib}M"]
    src = Qemu(work, "src", size, [*backend, "-machine", "memory-backend=mem0", "-S"])
    dst = None
    try:
        dst = Qemu(work, "dst", size, ["-object", f"memory-backend-ram,id=mem0,size={mib}M",
                                       "-machine", "memory-backend=mem0", "-incoming", "defer"])
        for q in (src, dst):
            _mf_setup(q.cmd, channels)
        sock = work / "q-mig.sock"
        dst.cmd("migrate-incoming", uri=f"unix:{sock}" if transport == "unix" else "tcp:127.0.0.1:0")
        uri = _listening_uri(dst.cmd, transport, sock)
        return _measure(src.cmd, src.proc.pid, dst.proc.pid, uri, size, settle, poll)
    finally:
        src.stop()
        if dst is not None:
            dst.stop()
        (work / "q-mig.sock").unlink(missing_ok=True)


def run_migd(work: Path, ram: Path | None, size: int, transport: str, channels: int, settle: float,
             poll: float, checksums: bool = True) -> dict[str, Any]:
    mem = f"{size >> 20}M"
    sock = work / "m-mig.sock"
    backing = ["--mem-path", str(ram)] if ram is not None else []  # -S: nothing writes the shared file
    src = Daemon(work, "src", "-m", mem, "-S", *backing)
    dst = None
    try:
        dst = Daemon(work, "dst", "-m", mem, "-S", "--incoming",
                     f"unix:{sock}" if transport == "unix" else "tcp:127.0.0.1:0")
        for d in (src, dst):
            _mf_setup(d.cmd, channels)
        if not checksums:
            src.cmd("migrate-set-parameters", **{"x-migd-checksums": False})
        uri = _listening_uri(dst.cmd, transport, sock)
        result = _measure(src.cmd, src.proc.pid, dst.proc.pid, uri, size, settle, poll)
        dinfo = wait_done(dst)
        if dinfo["status"] != "completed":
            raise RuntimeError(f"destination {dinfo['status']}: {dinfo.get('error-desc')}")
        if src.cmd("x-migd-ram-digest") != dst.cmd("x-migd-ram-digest"):
            raise RuntimeError("migd: RAM digests differ")
        return result
    finally:
        src.stop()
        if dst is not None:
            dst.stop()
        sock.unlink(missing_ok=True)


def _pair(transport: str) -> tuple[socket.socket, socket.socket]:
    if transport == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def ceiling(ram: Path, transport: str) -> float:
    """GB/s of the same bytes through a bare socket pair, sender here and reader in a child process."""
    a, b = _pair(transport)
    size = ram.stat().st_size
    with open(ram, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        pid = os.fork()
        if pid == 0:  # the reader: everything, then one byte back
            a.close()
            buf = bytearray(CHUNK)
            left = size
            while left:
                n = b.recv_into(buf, min(CHUNK, left))
                if not n:
                    os._exit(1)
                left -= n
            b.sendall(b"k")
            os._exit(0)
        b.close()
        try:
            t0 = time.perf_counter()
            for off in range(0, size, CHUNK):
                a.sendall(view[off : off + CHUNK])
            ok = a.recv(1) == b"k"
            elapsed = time.perf_counter() - t0
        finally:
            view.release()
            a.close()
            os.waitpid(pid, 0)
    if not ok:
        raise RuntimeError("ceiling: the reader did not get every byte")
    return size / elapsed / 1e9


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--transport", nargs="+", default=["unix", "tcp"], choices=["unix", "tcp"])
    ap.add_argument("--channels", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds between the destination listening and migrate (default 1)")
    ap.add_argument("--poll", type=float, default=0.05,
                    help="seconds between query-migrate polls of the source (default 0.05, libvirt's interval)")
    ap.add_argument("--no-zero", action="store_true", help="skip the untouched-RAM case")
    ap.add_argument("--no-checksums", action="store_true",
                    help="also run migd with x-migd-checksums false (QEMU's stream, no checksum records)")
    args = ap.parse_args()
    if QEMU is None:
        print("qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="migd-vs-qemu-"))
    atexit.register(shutil.rmtree, work, True)
    ram = random_file(size)
    runners: dict[str, Any] = {"qemu": run_qemu, "migd": run_migd}
    if args.no_checksums:
        runners["migd-nock"] = functools.partial(run_migd, checksums=False)
    impls = tuple(runners)
    res: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    ceil: dict[str, list[float]] = {t: [] for t in args.transport}
    print(f"{args.size} random RAM, paused sources, max-bandwidth 0; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for rep in range(args.repeat):
        for transport in args.transport:
            ceil[transport].append(ceiling(ram, transport))
            print(f"rep {rep + 1} {transport:4} ceiling {ceil[transport][-1]:5.2f} GB/s", flush=True)
            for ch in args.channels:
                order = impls if rep % 2 == 0 else impls[::-1]
                for who in order:
                    r = runners[who](work, ram, size, transport, ch, args.settle, args.poll)
                    res.setdefault((transport, who, ch), []).append(r)
                    print(f"rep {rep + 1} {transport:4} {who} ch={ch}: {r['gbps']:5.2f} GB/s total {r['total_ms']} ms "
                          f"downtime {r['downtime_ms']} ms CPU s/GiB {r['src_cpu']:.2f}/{r['dst_cpu']:.2f}", flush=True)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| transport | impl | channels | GB/s median (range) | total ms | downtime ms | "
          "× QEMU same channels | × QEMU best | × ceiling | CPU s/GiB src / dst |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for transport in args.transport:
        q_best = max(_med([r["gbps"] for r in res[(transport, "qemu", ch)]]) for ch in args.channels)
        c_med = _med(ceil[transport])
        for who in impls:
            for ch in args.channels:
                rs = res[(transport, who, ch)]
                q_same = _med([r["gbps"] for r in res[(transport, "qemu", ch)]])
                g = [r["gbps"] for r in rs]
                label = "1" if ch == 1 else f"multifd {ch}"
                print(f"| {transport} | {who} | {label} | {_med(g):.2f} ({min(g):.2f}–{max(g):.2f}) | "
                      f"{_med([r['total_ms'] for r in rs]):.0f} | {_med([r['downtime_ms'] for r in rs]):.0f} | "
                      f"{_med(g) / q_same:.2f} | {_med(g) / q_best:.2f} | {_med(g) / c_med:.2f} | "
                      f"{_med([r['src_cpu'] for r in rs]):.2f} / {_med([r['dst_cpu'] for r in rs]):.2f} |")
        cs = ceil[transport]
        print(f"| {transport} | ceiling | socket pair | {c_med:.2f} ({min(cs):.2f}–{max(cs):.2f}) | | | | "
              f"{c_med / q_best:.2f} | 1.00 | |")
    if not args.no_zero:
        print("\nuntouched RAM, one channel, unix:")
        for who in ("qemu", "migd"):
            r = runners[who](work, None, size, "unix", 1, args.settle, args.poll)
            verdict = f" (target <= {ZERO_TARGET_MS} ms: {'met' if r['total_ms'] <= ZERO_TARGET_MS else 'NOT met'})"
            print(f"  {who}: total-time {r['total_ms']} ms, downtime {r['downtime_ms']} ms"
                  f"{verdict if who == 'migd' else ''}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
