#!/usr/bin/env python3
"""Migration throughput between two real migd processes: 1 GiB of random pages and of zero pages,
over unix and tcp, with max-bandwidth 0.

The random source backs its RAM with a /dev/shm file of random bytes (``--mem-path``), so no workload
has to fill it first; the zero source has untouched anonymous RAM. Both guests are idle, so the figure
is the data plane's: source page loop + socket + destination loader. The destination waits with -S and
its RAM digest is checked against the source's after every run. GB/s = guest RAM bytes / total-time
(the source's, which with the return path ends only once the destination acknowledged the load).

    python3 bench/bench_throughput.py [--size 1G] [--repeat 3] [--transport unix tcp] [--json out.json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError

ROOT = Path(__file__).resolve().parent.parent
TARGET_RANDOM_GBPS = 1.5
SETTLE = 1.0  # seconds between the destination listening and `migrate` (its prefault runs then)


def connect_qmp(proc: subprocess.Popen[bytes], path: Path, timeout: float, failure: str) -> QEMUMonitorProtocol:
    """A negotiated QMP client on the socket of a process just started (migd or QEMU): the socket file
    appears a moment before the process listens on it, so refusals are retried while it lives
    (qemu.qmp's ConnectError is no OSError); RuntimeError(``failure``) if it dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(failure)
        if path.exists():
            qmp = QEMUMonitorProtocol(str(path))
            try:
                qmp.connect(negotiate=True)
                return qmp
            except (OSError, ConnectError):
                pass
        time.sleep(0.02)


class Daemon:
    """One ``python -m migd`` with a unix QMP socket."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migd", "--name", name, "--qmp", f"unix:{self.qmp_path}", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
        self.qmp = connect_qmp(self.proc, self.qmp_path, 60, f"{name} did not start; see {workdir}/{name}.log")

    def cmd(self, name: str, **args: Any) -> Any:
        return self.qmp.cmd(name, **args)

    def stop(self) -> None:
        try:
            self.qmp.cmd("quit")
            self.qmp.close()
        except Exception:  # noqa: BLE001 - the process may be gone already
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_RANDOM_FILES: dict[int, Path] = {}


def random_file(size: int) -> Path:
    """A /dev/shm file of random bytes, private to this run (other benchmarks map theirs shared and
    may write into them), made once per size and removed at exit."""
    path = _RANDOM_FILES.get(size)
    if path is None:
        path = _RANDOM_FILES[size] = Path(f"/dev/shm/migd-throughput-{os.getpid()}-{size}")
        atexit.register(path.unlink, missing_ok=True)
        rng = np.random.default_rng(1234)
        chunk = 64 << 20
        with open(path, "wb") as f:
            for _ in range(size // chunk):
                f.write(rng.integers(1, 256, size=chunk, dtype=np.uint8).tobytes())
            if size % chunk:
                f.write(rng.integers(1, 256, size=size % chunk, dtype=np.uint8).tobytes())
    return path


def wait_done(d: Daemon, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = d.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.01)
    raise RuntimeError(f"{d.name}: migration did not finish in {timeout}s")


def run_once(workdir: Path, size: int, kind: str, transport: str) -> dict[str, Any]:
    mem = f"{size // (1 << 20)}M"
    src_args = ["-m", mem]
    if kind == "random":
        src_args += ["--mem-path", str(random_file(size))]
    if transport == "unix":
        incoming = f"unix:{workdir}/mig.sock"
    else:
        incoming = "tcp:127.0.0.1:0"
    src = Daemon(workdir, "src", *src_args)
    dst = Daemon(workdir, "dst", "-m", mem, "-S", "--incoming", incoming)
    try:
        deadline = time.monotonic() + 60
        while "socket-address" not in (info := dst.cmd("query-migrate")):  # listening comes after QMP
            if time.monotonic() > deadline:
                raise RuntimeError(f"destination is not listening: {info}")
            time.sleep(0.01)
        time.sleep(SETTLE)  # let the destination prefault its RAM, as a waiting destination has
        if transport == "tcp":
            port = info["socket-address"][0]["port"]
            uri = f"tcp:127.0.0.1:{port}"
        else:
            uri = incoming
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        cpu0 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        src.cmd("migrate", uri=uri)
        info = wait_done(src)
        cpu1 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        if info["status"] != "completed":
            raise RuntimeError(f"migration {info['status']}: {info.get('error-desc')}")
        dinfo = wait_done(dst)
        if dinfo["status"] != "completed":
            raise RuntimeError(f"destination {dinfo['status']}: {dinfo.get('error-desc')}")
        same = src.cmd("x-migd-ram-digest") == dst.cmd("x-migd-ram-digest")
        total_ms = info["total-time"]
        ram = info["ram"]
        return {
            "kind": kind, "transport": transport, "size": size, "total_ms": total_ms,
            "setup_ms": info.get("setup-time"), "downtime_ms": info.get("downtime"),
            "gbps": size / (total_ms / 1000) / 1e9 if total_ms else float("inf"),
            "transferred": ram["transferred"], "normal": ram["normal"], "duplicate": ram["duplicate"],
            "digest_equal": same,
            "src_cpu_s_per_gib": (cpu1[0] - cpu0[0]) / (size / (1 << 30)),
            "dst_cpu_s_per_gib": (cpu1[1] - cpu0[1]) / (size / (1 << 30)),
        }
    finally:
        src.stop()
        dst.stop()


def event_time(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def loader_once(workdir: Path, size: int) -> dict[str, Any]:
    """The destination alone: a saved 1 GiB random stream read with ``file:`` from /dev/shm.

    Timed from the MIGRATION ``active`` event (first data; the destination prefaulted its RAM
    before) to ``completed``, so it is the loader's speed, not the source's."""
    mem = f"{size // (1 << 20)}M"
    state = Path(tempfile.mkdtemp(prefix="migd-bench-", dir="/dev/shm")) / "state"
    try:
        src = Daemon(workdir, "src", "-m", mem, "--mem-path", str(random_file(size)))
        try:
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
            src.cmd("migrate", uri=f"file:{state}")
            saved = wait_done(src)
        finally:
            src.stop()
        dst = Daemon(workdir, "dst", "-m", mem, "-S", "--incoming", "defer")
        try:
            dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
            cpu0 = cpu_seconds(dst.proc.pid)
            dst.cmd("migrate-incoming", uri=f"file:{state}")
            info = wait_done(dst)
            cpu1 = cpu_seconds(dst.proc.pid)
            if info.get("status") != "completed":
                raise RuntimeError(f"load {info}")
            stamps: dict[str, float] = {}
            deadline = time.monotonic() + 10
            while "completed" not in stamps and time.monotonic() < deadline:
                for event in dst.qmp.get_events(wait=0.5):
                    if event["event"] == "MIGRATION":
                        stamps[event["data"]["status"]] = event_time(event)
            load_s = stamps["completed"] - stamps["active"]
            return {"kind": "loader", "transport": "file", "size": size, "total_ms": round(load_s * 1000),
                    "gbps": size / load_s / 1e9, "save_ms": saved.get("total-time"),
                    "dst_cpu_s_incl_prefault": cpu1 - cpu0}
        finally:
            dst.stop()
    finally:
        shutil.rmtree(state.parent, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="guest RAM (M/G suffix)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--transport", nargs="+", default=["unix", "tcp"], choices=["unix", "tcp"])
    ap.add_argument("--kind", nargs="+", default=["random", "zero"], choices=["random", "zero"])
    ap.add_argument("--json", type=Path, help="write the raw results here")
    ap.add_argument("--loader", action="store_true", help="also time the destination alone (file: of a saved stream)")
    opts = ap.parse_args()
    unit = {"M": 1 << 20, "G": 1 << 30}[opts.size[-1].upper()]
    size = int(opts.size[:-1]) * unit
    results: list[dict[str, Any]] = []
    print(f"{'kind':7} {'transport':9} {'GB/s':>7} {'total ms':>9} {'downtime ms':>11} "
          f"{'src CPU s/GiB':>13} {'dst CPU s/GiB':>13}  digest")
    for kind in opts.kind:
        for transport in opts.transport:
            runs = []
            for _ in range(opts.repeat):
                with tempfile.TemporaryDirectory(prefix="migd-bench-") as tmp:
                    r = run_once(Path(tmp), size, kind, transport)
                runs.append(r)
                results.append(r)
                print(f"{kind:7} {transport:9} {r['gbps']:7.2f} {r['total_ms']:9} {r['downtime_ms']!s:>11} "
                      f"{r['src_cpu_s_per_gib']:13.2f} {r['dst_cpu_s_per_gib']:13.2f}  "
                      f"{'ok' if r['digest_equal'] else 'MISMATCH'}", flush=True)
            best = max(r["gbps"] for r in runs)
            median = statistics.median(r["gbps"] for r in runs)
            note = ""
            if kind == "random":
                note = f"  (target >= {TARGET_RANDOM_GBPS} GB/s: {'met' if best >= TARGET_RANDOM_GBPS else 'NOT met'})"
            print(f"== {kind} over {transport}: median {median:.2f} GB/s, best {best:.2f} GB/s{note}")
    if opts.loader:
        runs = []
        for _ in range(opts.repeat):
            with tempfile.TemporaryDirectory(prefix="migd-bench-") as tmp:
                r = loader_once(Path(tmp), size)
            runs.append(r)
            results.append(r)
            print(f"loader  file      {r['gbps']:7.2f} {r['total_ms']:9}  (dst CPU incl. prefault "
                  f"{r['dst_cpu_s_incl_prefault']:.2f} s; source save to /dev/shm: {r['save_ms']} ms)", flush=True)
        best = max(r["gbps"] for r in runs)
        print(f"== loader alone: median {statistics.median(r['gbps'] for r in runs):.2f} GB/s, best {best:.2f} GB/s"
              f"  (target >= {TARGET_RANDOM_GBPS} GB/s: {'met' if best >= TARGET_RANDOM_GBPS else 'NOT met'})")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r.get("digest_equal", True) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
