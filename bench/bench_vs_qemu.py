"""migd against QEMU, side by side, in one run: 1 GiB of random RAM over a unix socket, max-bandwidth 0.

Both sources map the same /dev/shm file of random bytes as guest RAM (QEMU: memory-backend-file,
share=off; migd: --mem-path on a private copy of it), both destinations start with fresh RAM. Runs
alternate QEMU and migd so the machine's noise hits both alike. Needs `qemu-system-x86_64`
(Debian: apt-get install qemu-system-x86).

    python3 bench/bench_vs_qemu.py [--size 1G] [--runs 3] [--running]

Both destinations get --settle seconds (default 1) between listening and the migrate command, as a
destination started ahead of the migration has (migd prefaults its RAM meanwhile; QEMU does not).
Prints total-time, downtime and GB/s per run and the medians; the ratio is migd / QEMU throughput.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = shutil.which("qemu-system-x86_64")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_random_file(path: Path, size: int) -> None:
    rng = np.random.default_rng(1)
    with open(path, "wb") as f:
        chunk = 64 << 20
        for _ in range(size // chunk):
            f.write(rng.integers(1, 256, chunk, dtype=np.uint8).tobytes())


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not create {path}")
        time.sleep(0.02)


def connect(path: Path) -> QEMUMonitorProtocol:
    qmp = QEMUMonitorProtocol(str(path))
    qmp.connect(negotiate=True)
    return qmp


SETTLE = 1.0  # seconds both destinations get between listening and the migrate command


def migrate_and_wait(src: QEMUMonitorProtocol, uri: str) -> dict:
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    time.sleep(SETTLE)  # a destination is started before the migrate command, as in real use
    src.cmd("migrate", uri=uri)
    while True:
        info = src.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            if info["status"] != "completed":
                raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
            if info.get("total-time"):  # QEMU may report completed before its figures (anchor notes)
                return info
        time.sleep(0.01)


def qemu_cmd(qmp: Path, size: int, extra: list[str]) -> list[str]:
    return [QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", "qemu64", "-nodefaults", "-display", "none",
            "-m", f"{size >> 20}M", "-qmp", f"unix:{qmp},server=on,wait=off", *extra]


def run_qemu(work: Path, ram_file: Path, size: int, paused: bool) -> dict:
    mig = work / "q-mig.sock"
    backend = ["-object", f"memory-backend-file,id=mem0,size={size >> 20}M,mem-path={ram_file},share=off",
               "-machine", "memory-backend=mem0"]
    src = subprocess.Popen(qemu_cmd(work / "q-src.sock", size, backend + (["-S"] if paused else [])))
    fresh = ["-object", f"memory-backend-ram,id=mem0,size={size >> 20}M", "-machine", "memory-backend=mem0"]
    dst = subprocess.Popen(qemu_cmd(work / "q-dst.sock", size, fresh + ["-incoming", f"unix:{mig}"]))
    try:
        wait_socket(work / "q-src.sock", src)
        wait_socket(work / "q-dst.sock", dst)
        wait_socket(mig, dst)
        return migrate_and_wait(connect(work / "q-src.sock"), f"unix:{mig}")
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()
        for name in ("q-src.sock", "q-dst.sock", "q-mig.sock"):
            (work / name).unlink(missing_ok=True)


def run_migd(work: Path, ram_file: Path, size: int, paused: bool) -> dict:
    mig = work / "m-mig.sock"
    copy = work / "m-src.ram"  # migd maps --mem-path shared: give it its own copy of the same bytes
    shutil.copyfile(ram_file, copy)
    common = [sys.executable, "-m", "migd", "-m", f"{size >> 20}M"]
    src = subprocess.Popen(common + ["--name", "src", "--mem-path", str(copy),
                                     "--qmp", f"unix:{work / 'm-src.sock'}"] + (["-S"] if paused else []))
    dst = subprocess.Popen(common + ["--name", "dst", "--qmp", f"unix:{work / 'm-dst.sock'}",
                                     "--incoming", f"unix:{mig}"])
    try:
        wait_socket(work / "m-src.sock", src)
        wait_socket(work / "m-dst.sock", dst)
        wait_socket(mig, dst)
        return migrate_and_wait(connect(work / "m-src.sock"), f"unix:{mig}")
    finally:
        for p in (src, dst):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        copy.unlink(missing_ok=True)
        for name in ("m-src.sock", "m-dst.sock", "m-mig.sock"):
            (work / name).unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--running", action="store_true", help="sources run instead of starting paused (-S)")
    ap.add_argument("--settle", type=float, default=SETTLE,
                    help="seconds between the destination listening and migrate (default 1)")
    args = ap.parse_args()
    globals()["SETTLE"] = args.settle
    if QEMU is None:
        print("qemu-system-x86_64 not found: apt-get install qemu-system-x86", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="migd-vs-qemu-", dir="/dev/shm"))
    ram_file = work / "random.ram"
    make_random_file(ram_file, size)
    results: dict[str, list[tuple[float, float, float]]] = {"qemu": [], "migd": []}
    try:
        for i in range(args.runs):
            for who, run in (("qemu", run_qemu), ("migd", run_migd)):
                info = run(work, ram_file, size, not args.running)
                total, down = info["total-time"], info.get("downtime", 0)
                gbps = info["ram"]["transferred"] / (total / 1000) / 1e9
                results[who].append((total, down, gbps))
                print(f"run {i + 1} {who:4}: total-time {total:6} ms  downtime {down:5} ms  {gbps:5.2f} GB/s",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {who: statistics.median(r[2] for r in rs) for who, rs in results.items()}
    for who, rs in results.items():
        print(f"{who}: median total-time {statistics.median(r[0] for r in rs):.0f} ms, "
              f"downtime {statistics.median(r[1] for r in rs):.0f} ms, {med[who]:.2f} GB/s")
    print(f"throughput ratio migd/QEMU: {med['migd'] / med['qemu']:.2f}x "
          f"({'running' if args.running else 'paused'} sources, {args.size})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
