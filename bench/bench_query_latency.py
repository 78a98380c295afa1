#!/usr/bin/env python3
"""query-migrate latency over a whole migration, on a second QMP connection.

Two real migd processes (source and destination) on unix sockets; one QMP connection starts the
migration with ``max-bandwidth 0``, a second one sends ``query-migrate`` back to back until the migration
ends and records every round trip. migd answers from published counters, so the answers must keep coming
through the switch-over (QEMU's monitor is frozen for its whole downtime: max 290-350 ms there).

    python3 bench/bench_query_latency.py [--memory 1G] [--workload idle] [--runs 3] [--random-ram]
        [--channels 1 2] [--client c|python] [--interval-ms 0] [--variant NAME[:VAR=VALUE,...]]...
        [--probe] [--probe-ms 0.5] [--top 8] [--dst] [--py-spy DIR] [--gil-trace DIR]

The timing client is ``bench/qmp_probe.c``, compiled at start with the first C compiler found (cc,
gcc, clang, tcc), or ``--client python`` (qemu.qmp in this process, the only one without a
compiler): a Python client spends ~0.3 ms of its own per round trip and competes for the same two
cores, so it measures itself as much as the daemon. Whichever it is, the same client first polls the
idle source for 0.5 s: that reference, printed beside every run, is what the client and the host
cost without a migration. ``--variant`` runs the daemons with extra environment variables, one
variant after the other within each repetition (alternating, so that a change of the host's load hits
all of them), e.g. ``--variant before:MIGD_DATA_PLANE_NICE=0 --variant after``.

Each run is done once per ``--channels`` entry: 1 is one channel (no multifd), N > 1 is multifd with N
channels on both sides. Prints p50/p99/max in ms per run (with the status of the slowest answer and
where it fell, 0..1 through the migration, and how many took over 1 ms), how many answers arrived
while the status was ``device`` (the switch-over), the migration's own figures (MB/s: a client that
asks back to back takes CPU from the migration), and a summary per variant and channel count.
Target (issue 13): p99 <= 1 ms, max <= 10 ms.

``--gil-trace DIR`` (root, perf) records every GIL hand-over of both daemons with uprobes
(``bench/giltrace.py``) and prints, per daemon, how often the event loop waited for the GIL over
0.5 ms and in how many of those waits another thread really held it (the rest of a slow wait the GIL
was free and the loop had no CPU), and which threads took the GIL how often. Slower under the probes.

``--probe`` runs both daemons with ``MIGD_GIL_PROBE=1`` (migd/gilprobe.py) and prints, per daemon,
the GIL stalls it saw, grouped by the innermost frame of each thread that was not waiting: the
culprits, with their count and longest stall. The probe's own thread competes for the GIL, so the
latencies of a probed run are a little worse than those of a plain one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from giltrace import GilTrace, python_binary, summarize
from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parent.parent


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def random_file(path: Path, size: int) -> Path:
    """A file of random bytes (to back the source's RAM: every page must really be sent)."""
    if path.exists() and path.stat().st_size == size:
        return path
    chunk = 64 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return path


class Migd:
    """One migd process with its QMP socket."""

    def __init__(self, name: str, tmp: Path, args: list[str], probe_ms: float | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.qmp_path = tmp / f"{name}.qmp"
        self.log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.probe_path: Path | None = None
        env = dict(os.environ)
        env.update(extra_env or {})
        if probe_ms is not None:
            self.probe_path = tmp / f"{name}.gil.jsonl"
            env.update({"MIGD_GIL_PROBE": "1", "MIGD_GIL_PROBE_MS": str(probe_ms),
                        "MIGD_GIL_PROBE_OUT": str(self.probe_path)})
        cmd = [sys.executable, "-m", "migd", "--name", name, "--qmp", f"unix:{self.qmp_path}", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stalls(self, since: float) -> list[dict[str, Any]]:
        """The probe's stall records from ``since`` (monotonic seconds) on."""
        if self.probe_path is None or not self.probe_path.exists():
            return []
        out = []
        for line in self.probe_path.read_text().splitlines():
            rec = json.loads(line)
            if rec["t"] >= since:
                out.append(rec)
        return out

    async def client(self, timeout: float = 30.0) -> QMPClient:
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start (see {self.log.name})")
            await asyncio.sleep(0.05)
        client = QMPClient(self.name)
        await client.connect(str(self.qmp_path))
        return client

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def source_args(memory: int, workload: str, mem_path: Path | None) -> list[str]:
    args = ["-m", f"{memory >> 20}M", "--workload", workload]
    if mem_path is not None:
        args += ["--mem-path", str(mem_path)]
    return args


IDLE_REF = 0.5  # seconds of query-migrate against the idle source first: the reference of the run
SETTLE = 2.0  # seconds: a destination prefaults its RAM right after it starts; migrations start later


async def start_pair(tmp: Path, memory: int, workload: str, mem_path: Path | None,
                     probe_ms: float | None, env: dict[str, str] | None = None) -> tuple[Migd, Migd]:
    """Source and destination; the destination stays paused (-S) so its RAM can be compared."""
    src = Migd("src", tmp, source_args(memory, workload, mem_path), probe_ms, env)
    # configured like the source, as a QEMU destination is (a different workload spec would be built
    # at device-load time, inside the downtime); "defer" so multifd can be set before listening
    dst = Migd("dst", tmp, ["-m", f"{memory >> 20}M", "--workload", workload, "-S",
                            "--incoming", "defer"], probe_ms, env)
    return src, dst


def culprits(stalls: list[dict[str, Any]], top: int) -> list[str]:
    """Stalls grouped by the busiest thread and its innermost frame: count, longest, GIL share.

    A stall's GIL part is its lateness minus the probe's own run-queue wait (no CPU for it).
    """
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    stacks: dict[tuple[str, str], list[str]] = {}
    for rec in stalls:
        if "gc" in rec:
            key = (rec["thread"], f"garbage collection, generation {rec['gc']}")
            stacks[key] = []
            groups[key].append((rec["ms"], rec["ms"]))
            continue
        if not rec["threads"]:
            key = ("(none)", "no thread ran: host scheduling")
            stacks[key] = []
        else:
            thread, info = next(iter(rec["threads"].items()))
            stack = info["stack"]
            key = (thread, stack[0] if stack else "?")
            stacks[key] = stack
        groups[key].append((rec["late_ms"], max(0.0, rec["late_ms"] - rec.get("runq_ms", 0.0))))
    ranked = sorted(groups.items(), key=lambda kv: max(g for _, g in kv[1]), reverse=True)[:top]
    lines = ["   by the busiest thread's innermost frame:"]
    for (thread, where), lates in ranked:
        gil = [g for _, g in lates]
        lines.append(f"    {thread:<14} n={len(lates):<4} max late={max(x for x, _ in lates):6.2f} ms "
                     f"of which GIL {max(gil):6.2f} ms, GIL sum={sum(gil):7.1f} ms  {where}")
        if len(stacks[(thread, where)]) > 1:
            lines.append("        <- " + " <- ".join(stacks[(thread, where)][1:4]))
    # computing holds: the probe had a CPU (its lateness is not run-queue wait) and one thread burnt
    # CPU for most of that time (not a holder the host preempted, nor a thread in a GIL-free call)
    held = []
    for rec in stalls:
        if "late_ms" not in rec or not rec["threads"]:
            continue
        gil = rec["late_ms"] - rec.get("runq_ms", 0.0)
        thread, info = next(iter(rec["threads"].items()))
        if gil >= 1.0 and info["cpu_ms"] >= 0.8 * gil:
            held.append((gil, info["cpu_ms"], thread, info["stack"]))
    held.sort(reverse=True)
    lines.append(f"   computing holds of 1 ms or more (probe had a CPU, one thread busy): {len(held)}")
    for gil, cpu, thread, stack in held[:top]:
        lines.append(f"    {gil:6.2f} ms GIL, {thread} busy {cpu:.2f} ms: " + " <- ".join(stack[:4]))
    return lines


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def spy_on(d: Migd, out_dir: Path) -> subprocess.Popen[bytes]:
    """py-spy sampling which thread holds the GIL (``--gil``) without pausing the daemon
    (``--nonblocking``, hence Python frames only); speedscope output keeps the samples in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["py-spy", "record", "--gil", "--nonblocking", "--threads", "-r", "1000", "-f", "speedscope",
           "-o", str(out_dir / f"{d.name}.speedscope.json"), "-p", str(d.proc.pid)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PROBE_SOURCE = Path(__file__).resolve().parent / "qmp_probe.c"
TERMINAL = ("completed", "failed", "cancelled")


def build_c_probe(out_dir: Path) -> Path | None:
    """bench/qmp_probe.c compiled with the first C compiler found (cc, gcc, clang, tcc); None without one."""
    for compiler in ("cc", "gcc", "clang", "tcc"):
        path = shutil.which(compiler)
        if path is None:
            continue
        binary = out_dir / "qmp_probe"
        done = subprocess.run([path, "-O2", "-o", str(binary), str(PROBE_SOURCE)], capture_output=True)
        if done.returncode == 0:
            return binary
    return None


class CProbe:
    """bench/qmp_probe.c on the source's QMP socket: the idle reference first, then the migration."""

    def __init__(self, binary: Path, qmp_path: Path, interval_ms: float) -> None:
        self.binary, self.qmp_path, self.interval_ms = binary, qmp_path, interval_ms
        self.proc: asyncio.subprocess.Process | None = None

    async def idle_phase(self) -> None:
        """Start it; returns once its idle phase (IDLE_REF seconds) is over."""
        self.proc = await asyncio.create_subprocess_exec(
            str(self.binary), str(self.qmp_path), str(IDLE_REF), "600", str(int(self.interval_ms * 1000)),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"qmp_probe did not start: {line!r}")

    async def migration_phase(self) -> tuple[list[float], list[tuple[float, str]]]:
        """Let it poll until a terminal status; its idle and migration samples (ms, status)."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        idle: list[float] = []
        samples: list[tuple[float, str]] = []
        while True:
            line = (await self.proc.stdout.readline()).decode().split()
            if not line or line[0] == "end":
                break
            if line[0] == "i":
                idle.append(float(line[1]) / 1000)
            else:
                samples.append((float(line[1]) / 1000, line[2]))
        if await self.proc.wait() != 0:
            raise RuntimeError("qmp_probe failed")
        return idle, samples


async def one_run(tmp: Path, memory: int, workload: str, mem_path: Path | None, channels: int,
                  probe_ms: float | None, top: int, spy_dir: Path | None = None,
                  poll_destination: bool = False, env: dict[str, str] | None = None,
                  c_probe: Path | None = None, interval_ms: float = 0.0,
                  tracer: GilTrace | None = None, trace_dir: Path | None = None) -> dict[str, Any]:
    src, dst = await start_pair(tmp, memory, workload, mem_path, probe_ms, env)
    stall_lines: dict[str, list[str]] = {}
    try:
        control, probe = await src.client(), await src.client()
        dclient = await dst.client()
        await control.execute("migrate-set-parameters", {"max-bandwidth": 0})
        if channels > 1:
            for c in (control, dclient):
                await c.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "multifd", "state": True}]})
                await c.execute("migrate-set-parameters", {"multifd-channels": channels})
        await dclient.execute("migrate-incoming", {"uri": f"unix:{tmp}/mig.sock"})
        await asyncio.sleep(SETTLE)
        started = time.monotonic()
        cpu0 = {d.name: d.cpu_seconds() for d in (src, dst)}
        # the reference in the same run: the same loop against the idle source (the machine's floor)
        idle: list[float] = []
        samples: list[tuple[float, str]] = []
        cprobe = CProbe(c_probe, src.qmp_path, interval_ms) if c_probe is not None else None
        if cprobe is not None:
            await cprobe.idle_phase()
        else:
            t_end = time.monotonic() + IDLE_REF
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                await probe.execute("query-migrate")
                idle.append((time.perf_counter() - t0) * 1000)
                if interval_ms:
                    await asyncio.sleep(interval_ms / 1000)

        async def poll() -> dict[str, Any]:
            if cprobe is not None:
                c_idle, c_samples = await cprobe.migration_phase()
                idle.extend(c_idle)
                samples.extend(c_samples)
                info: dict[str, Any] = await control.execute("query-migrate")
                return info
            while True:
                t0 = time.perf_counter()
                info = await probe.execute("query-migrate")
                samples.append(((time.perf_counter() - t0) * 1000, info.get("status", "none")))
                if info.get("status") in TERMINAL:
                    return info
                if interval_ms:
                    await asyncio.sleep(interval_ms / 1000)

        spies = [spy_on(d, spy_dir) for d in (src, dst)] if spy_dir is not None else []
        if tracer is not None and trace_dir is not None:
            for d in (src, dst):
                tracer.record(d.proc.pid, trace_dir / f"{d.name}.perf.data")
        dst_lat: list[float] = []

        async def poll_dst() -> None:
            """The destination's query-migrate too: its incoming thread must not starve its loop."""
            while not poller.done():
                t0 = time.perf_counter()
                await dclient.execute("query-migrate")
                dst_lat.append((time.perf_counter() - t0) * 1000)

        poller = asyncio.create_task(poll())
        dst_poller = asyncio.create_task(poll_dst() if poll_destination else asyncio.sleep(0))
        await control.execute("migrate", {"uri": f"unix:{tmp}/mig.sock"})
        info = await asyncio.wait_for(poller, 600)
        ended = time.monotonic()
        cpu = {d.name: round(d.cpu_seconds() - cpu0[d.name], 2) for d in (src, dst)}
        await asyncio.wait_for(dst_poller, 60)
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        for (path, pid), d in zip(tracer.stop() if tracer is not None else [], (src, dst), strict=False):
            stall_lines[f"{d.name} gil"] = summarize(path, pid, f"{d.name} GIL trace")
        for c in (control, probe, dclient):
            await c.disconnect()
        for d in (src, dst):
            records = [r for r in d.stalls(started) if r["t"] <= ended + 0.5]
            stalls = [r for r in records if "late_ms" in r]
            if d.probe_path is not None:
                runq = sum(r.get("runq_ms", 0.0) for r in stalls)
                late = sum(r["late_ms"] for r in stalls)
                stall_lines[d.name] = [f"  {d.name}: {len(stalls)} stalls over {probe_ms} ms, "
                                       f"longest {max((r['late_ms'] for r in stalls), default=0.0)} ms, "
                                       f"{late:.0f} ms late in all, {runq:.0f} ms of it waiting for a CPU",
                                       *culprits(records, top)]
    finally:
        src.stop()
        dst.stop()
    lat = [s[0] for s in samples]
    return {
        "channels": channels,
        "variant": (env or {}),
        "client": "c" if c_probe is not None else "python",
        "cpu_s": cpu,
        "stall_lines": stall_lines,
        "status": info["status"],
        "samples": len(lat),
        "dst_p50_ms": round(statistics.median(dst_lat), 3) if dst_lat else None,
        "dst_p99_ms": round(percentile(dst_lat, 0.99), 3) if dst_lat else None,
        "dst_max_ms": round(max(dst_lat), 3) if dst_lat else None,
        "idle_p50_ms": round(statistics.median(idle), 3),
        "idle_p99_ms": round(percentile(idle, 0.99), 3),
        "idle_max_ms": round(max(idle), 3),
        "p50_ms": round(statistics.median(lat), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "max_ms": round(max(lat), 3),
        # where the slowest answer fell: its status and how far into the migration (0..1 of the samples)
        "max_at": (lambda i: f"{samples[i][1]} at {i / max(1, len(samples) - 1):.2f}")(
            max(range(len(lat)), key=lat.__getitem__)) if lat else None,
        "over_1ms": sum(1 for x in lat if x > 1.0),
        "during_switchover": sum(1 for _, st in samples if st in ("device", "pre-switchover")),
        "max_during_switchover_ms": round(max((x for x, st in samples if st == "device"), default=0.0), 3),
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "mbps": info.get("ram", {}).get("mbps"),
        "phases": info.get("x-migd-downtime-phases"),
        "error": info.get("error-desc"),
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="1G")
    ap.add_argument("--workload", default="idle")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--random-ram", action="store_true",
                    help="back the source's RAM with a /dev/shm file of random bytes")
    ap.add_argument("--channels", type=int, nargs="+", default=[1, 2],
                    help="1 = one channel; N > 1 = multifd with N channels (default: 1 2)")
    ap.add_argument("--probe", action="store_true", help="run the daemons with the GIL probe, print culprits")
    ap.add_argument("--probe-ms", type=float, default=0.5, help="stall threshold of the probe (ms)")
    ap.add_argument("--top", type=int, default=8, help="culprits printed per daemon")
    ap.add_argument("--gil-trace", type=Path, default=None, metavar="DIR",
                    help="trace every GIL hand-over of both daemons with perf uprobes into DIR (root; "
                         "bench/giltrace.py) and print who held the GIL while the event loop waited")
    ap.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                    help="record both daemons with py-spy --gil into DIR (speedscope)")
    ap.add_argument("--dst", action="store_true",
                    help="poll the destination's query-migrate too (a second poller: it loads the host more)")
    ap.add_argument("--client", choices=["c", "python"], default=None,
                    help="the timing client: bench/qmp_probe.c (default when a C compiler is found) or "
                         "qemu.qmp in this process")
    ap.add_argument("--interval-ms", type=float, default=0.0,
                    help="pause between two query-migrate (default 0: back to back)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[:VAR=VALUE,...]",
                    help="daemon environment of one variant (repeatable); runs alternate between them, "
                         "e.g. --variant off:MIGD_DATA_PLANE_NICE=0 --variant default")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    memory = parse_size(args.memory)
    variants = [parse_variant(v) for v in args.variant] or [("default", {})]
    # in /dev/shm and private to this invocation: two benches must never share a RAM file
    tmp = Path(tempfile.mkdtemp(prefix="migd-bench-", dir="/dev/shm"))
    c_probe = build_c_probe(tmp) if args.client != "python" else None
    if args.client == "c" and c_probe is None:
        print("no C compiler found for bench/qmp_probe.c (try --client python)", file=sys.stderr)
        return 2
    mem_path = random_file(tmp / "random.ram", memory) if args.random_ram else None
    results = []
    tracer = GilTrace(python_binary(os.getpid())) if args.gil_trace else None  # the daemons' interpreter
    if not args.json:
        print(f"client: {'bench/qmp_probe.c' if c_probe else 'qemu.qmp (Python, in this process)'}, "
              f"{'back to back' if not args.interval_ms else f'every {args.interval_ms} ms'}; "
              f"load average {os.getloadavg()[0]:.2f}")
    try:
        for i in range(args.runs):
            for channels in args.channels:
                for name, env in variants:
                    run_dir = tmp / f"run{i}-{channels}-{name}"
                    run_dir.mkdir()
                    r = await one_run(run_dir, memory, args.workload, mem_path, channels,
                                      args.probe_ms if args.probe else None, args.top,
                                      args.py_spy / f"run{i}-{channels}-{name}" if args.py_spy else None,
                                      args.dst, env, c_probe, args.interval_ms, tracer,
                                      args.gil_trace / f"run{i}-{channels}-{name}" if args.gil_trace else None)
                    r["name"] = name
                    r["load"] = round(os.getloadavg()[0], 2)
                    results.append(r)
                    if not args.json:
                        print_run(i, r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if tracer is not None:
            tracer.close()
    if args.json:
        print(json.dumps({"memory": memory, "workload": args.workload, "runs": results}, indent=1))
    else:
        for channels in args.channels:
            for name, _ in variants:
                rs = [r for r in results if r["channels"] == channels and r["name"] == name]
                print(f"{name} channels={channels}: p50 {[r['p50_ms'] for r in rs]} p99 {[r['p99_ms'] for r in rs]} "
                      f"max {[r['max_ms'] for r in rs]} ms (target p99 <= 1, max <= 10); idle reference "
                      f"p50 {[r['idle_p50_ms'] for r in rs]} p99 {[r['idle_p99_ms'] for r in rs]} "
                      f"max {[r['idle_max_ms'] for r in rs]} ms; MB/s {[mbytes(r) for r in rs]}"
                      + (f"; destination p99 {[r['dst_p99_ms'] for r in rs]} max {[r['dst_max_ms'] for r in rs]} ms"
                         if args.dst else ""))
    return 0 if all(r["status"] == "completed" for r in results) else 1


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``NAME[:VAR=VALUE,...]`` -> (NAME, environment)."""
    name, _, assignments = text.partition(":")
    env = {}
    for item in filter(None, assignments.split(",")):
        var, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text}: '{item}' is not VAR=VALUE")
        env[var] = value
    return name, env


def mbytes(r: dict[str, Any]) -> int | None:
    """The migration's own throughput in MB/s (query-migrate's mbps is megabits)."""
    return round(r["mbps"] / 8) if r["mbps"] else None


def print_run(i: int, r: dict[str, Any]) -> None:
    print(f"run {i + 1} {r['name']} channels={r['channels']}: {r['status']} samples={r['samples']} "
          f"p50={r['p50_ms']} ms p99={r['p99_ms']} ms max={r['max_ms']} ms ({r['max_at']}) "
          f">1ms={r['over_1ms']}  answers during switch-over="
          f"{r['during_switchover']} (max {r['max_during_switchover_ms']} ms)  "
          f"total={r['total_time_ms']} ms downtime={r['downtime_ms']} ms {mbytes(r)} MB/s "
          f"cpu s src={r['cpu_s']['src']} dst={r['cpu_s']['dst']} load={r['load']}")
    if r["dst_p50_ms"] is not None:
        print(f"  destination's query-migrate meanwhile: p50={r['dst_p50_ms']} ms p99={r['dst_p99_ms']} ms "
              f"max={r['dst_max_ms']} ms")
    print(f"  reference, idle source just before: p50={r['idle_p50_ms']} ms p99={r['idle_p99_ms']} ms "
          f"max={r['idle_max_ms']} ms")
    if r["error"]:
        print(f"  error: {r['error']}")
    for lines in r["stall_lines"].values():
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
