#!/usr/bin/env python3
"""Convergence scenarios (issue 10): does the estimate hold, does the migration converge?

Real source and destination migd processes over a unix socket. For each case (workload x
max-bandwidth x downtime-limit) a second QMP connection polls ``query-migrate`` every 10 ms and
records ``expected-downtime`` and ``x-migd-convergence``; at the end the daemon's estimate at the
switch-over (``x-migd-expected-downtime``) is held against the measured ``downtime``, and the
destination tells the guest's largest stall (``x-migd-query-machine``: the source's history travels
with the vCPUs, the switch-over's gap is added on arrival).

    python3 bench/bench_scenarios.py [--quick] [--memory 512M] [--timeout 20] [--no-anchor]
                                     [--cases 'idle:0:300;random,rate=64M:128M:50'] [--set NAME=VALUE]
                                     [--png bench/scenarios.png] [--json FILE] [--netdelay]

The matrix: dirty rate {idle, 16M, 64M, 200M on a 64 MiB hot set, 500M} x max-bandwidth {unlimited,
128 MiB/s, 32 MiB/s} x downtime-limit {300, 50} (30 cases); ``--quick`` runs 8 of them. Unless
``--no-anchor``, QEMU's hardest anchor case follows (docs/reference: a guest dirtying 512 MiB at
500 MB/s over 100 MiB/s, where QEMU never converges and needs ~100 s with auto-converge) with
``x-migd-auto-throttle``. A case is ``workload:max-bandwidth:downtime-limit`` (sizes with K/M/G; the
workload may contain commas). Prints one table row per case: total time, downtime, expected at the
switch-over and its ratio, the worst ratio after the first second (an estimate within 5 ms counts as
exact, as in issue 10's bound), bytes sent, the convergence states seen, the policy actions that
fired, the guest's largest stall after the migration (and before it, in brackets: a stall the
migration did not cause, e.g. while the destination started), and the final pass's CPU time of the
migration thread over its wall time in ms (``final_cpu``, from the source's policy trace: a final
pass that had a fraction of its wall time on a CPU was descheduled — the host's doing, not the
estimate's; with ``MIGD_POLICY_TRACE`` set the traces stay there, for replays), and ``dest``: the
destination's load pace on a CPU of its own in MB/s (its LOAD_PACE reports; 0 = none) over the MB its
socket still held at the switch-over, both as the policy saw them (the trace replayed), and
``steal_pct``: the share of the machine's CPU time the host took during the case (``/proc/stat``'s
steal; a case run while the host took its CPUs measured the host too). Writes a PNG (expected vs real
downtime, time to converge) when matplotlib is installed (``pip install 'migd[bench]'``). The TCP
cases with 10 and 50 ms of delay each way need network namespaces and root: ``bench/bench_netdelay.py``
(``--netdelay`` runs it here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's migd, for the trace replay
from bench_query_latency import SETTLE, parse_size, start_pair  # noqa: E402

from migd.migration import policytrace  # noqa: E402
from migd.migration.policytrace import SMALL_MS, error_factor  # noqa: E402

try:  # an optional extra of the bench only (pip install 'migd[bench]'): no picture without it
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

HERE = Path(__file__).resolve().parent
WORKLOADS = ("idle", "random,rate=16M", "random,rate=64M", "random,rate=200M,wss=64M", "random,rate=500M")
BANDWIDTHS = ("0", "128M", "32M")
LIMITS = (300, 50)
MATRIX = tuple(f"{w}:{b}:{lim}" for w in WORKLOADS for b in BANDWIDTHS for lim in LIMITS)
QUICK = (
    "idle:0:300",
    "random,rate=64M:0:300",
    "random,rate=64M:128M:300",
    "random,rate=16M:32M:50",
    "random,rate=64M:32M:300",
    "random,rate=200M,wss=64M:128M:50",
    "random,rate=200M,wss=64M:0:300",
    "random,rate=500M:32M:300",
)
ANCHOR = "random,rate=500M:100M:300"  # with x-migd-auto-throttle (QEMU: never; ~100 s with auto-converge)
TERMINAL = ("completed", "failed", "cancelled")
TRACE_ENV = "MIGD_POLICY_TRACE"  # migration/policytrace.py: the source writes what it fed its policy
TRACE_WAIT_S = 2.0  # s the trace of a finished migration may take to appear


def parse_case(text: str) -> tuple[str, int, int]:
    workload, bandwidth, limit = text.rsplit(":", 2)
    return workload, parse_size(bandwidth), int(limit)


def parse_value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    try:
        return parse_size(text)
    except ValueError:
        return text


async def one_case(tmp: Path, memory: int, case: str, timeout: float,
                   extra: dict[str, Any]) -> dict[str, Any]:
    workload, bandwidth, limit = parse_case(case)
    # every source records its policy trace (there, or where the caller asked): the final pass's
    # CPU time in it tells a descheduled thread from a wrong estimate
    traces = Path(os.environ.get(TRACE_ENV) or tmp / "traces")
    traces.mkdir(parents=True, exist_ok=True)
    seen = set(traces.glob("*.json"))
    saved_env = os.environ.get(TRACE_ENV)
    os.environ[TRACE_ENV] = str(traces)
    try:
        src, dst = await start_pair(tmp, memory, workload, None, None)
    finally:
        if saved_env is None:
            del os.environ[TRACE_ENV]
    final_cpu = None
    dest = None  # the destination's reported pace and the socket's backlog at the switch-over
    stall = before = None
    try:
        control, probe = await src.client(), await src.client()
        await control.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "events", "state": True}]})
        await control.execute("migrate-set-parameters",
                              {"max-bandwidth": bandwidth, "downtime-limit": limit, **extra})
        dclient = await dst.client()  # a destination started with -incoming defer
        await dclient.execute("migrate-incoming", {"uri": f"unix:{tmp}/mig.sock"})
        await asyncio.sleep(SETTLE)
        before = (await control.execute("x-migd-query-machine")).get("workload", {}).get("largest-stall-ms")
        samples: list[tuple[float, int, dict[str, Any]]] = []
        t0 = time.monotonic()
        await control.execute("migrate", {"uri": f"unix:{tmp}/mig.sock"})
        info: dict[str, Any] = {}
        while time.monotonic() - t0 < timeout:
            info = await probe.execute("query-migrate")
            if info.get("status") == "active":
                samples.append((time.monotonic() - t0, info.get("expected-downtime", 0),
                                info.get("x-migd-convergence", {})))
            if info.get("status") in TERMINAL:
                break
            await asyncio.sleep(0.01)
        else:
            await control.execute("migrate_cancel")
            info = {**info, "status": "timeout"}
        digest_ok = None
        if info.get("status") == "completed":
            digest_ok = (await control.execute("x-migd-ram-digest")
                         == await dclient.execute("x-migd-ram-digest"))
            machine = await dclient.execute("x-migd-query-machine")
            stall = machine.get("workload", {}).get("largest-stall-ms")
        else:
            machine = await control.execute("x-migd-query-machine")
            stall = machine.get("workload", {}).get("largest-stall-ms")
        deadline = time.monotonic() + TRACE_WAIT_S
        while info.get("status") == "completed" and time.monotonic() < deadline:
            new = sorted(set(traces.glob("*.json")) - seen)
            if new:
                doc = json.loads(new[-1].read_text())
                outcome = doc.get("outcome", {})
                policy, _ = policytrace.replay(doc)
                dest = f"{policy.drain_rate() / 1e6:.0f}/{policy.backlog / 1e6:.1f}"
                wall = (outcome.get("phases") or {}).get("ram-final")
                cpu = outcome.get("ram_final_cpu_ms")
                blocked = outcome.get("ram_final_write_ms")
                if wall is not None and cpu is not None:
                    final_cpu = f"{cpu:.0f}/{wall:.0f}"
                    if blocked is not None:  # time inside writes: on a CPU copying, or blocked
                        final_cpu += f" w{blocked:.0f} {outcome.get('ram_final_bytes', 0) / 1e6:.1f}MB"
                break
            await asyncio.sleep(0.05)
        for c in (control, probe, dclient):
            try:
                await c.disconnect()
            except (EOFError, ConnectionError):  # a destination that exits after a cancelled incoming
                pass
    finally:
        src.stop()
        dst.stop()
    downtime = info.get("downtime")
    expected = info.get("x-migd-expected-downtime")
    late = [e for t, e, _ in samples if t >= 1.0]
    worst = max((error_factor(e, downtime) for e in late), default=None) if downtime else None
    worst_e = max(late, key=lambda e: error_factor(e, downtime)) if downtime and late else None
    states: list[str] = []
    for _, _, conv in samples:
        st = conv.get("state")
        if st and (not states or states[-1] != st):
            states.append(st)
    actions = [f"{a.get('action')}={a.get('value')}" for a in info.get("x-migd-policy-actions", [])]
    return {
        "case": case, "status": info.get("status"), "digest": digest_ok,
        "total": info.get("total-time"), "downtime": downtime, "expected": expected,
        "ratio": round(expected / downtime, 2) if expected and downtime else None,
        "worst_after_1s": round(worst, 2) if worst is not None else None, "worst_expected": worst_e,
        "sent_mb": round(info.get("ram", {}).get("transferred", 0) / 2**20),
        "states": ">".join(states), "actions": ",".join(actions[:4]) + (",…" if len(actions) > 4 else ""),
        "stall_ms": f"{stall} ({before})", "final_cpu": final_cpu, "dest": dest, "phases": info.get("x-migd-downtime-phases"), "error": info.get("error-desc"),
        "limit": limit, "bandwidth": bandwidth, "workload": workload,
        "trace": [(round(t, 2), e, c.get("state"), c.get("eta-ms")) for t, e, c in samples[::10]],
    }


def draw(results: list[dict[str, Any]], path: Path, title: str) -> str:
    """The picture: expected (at the switch-over, and the worst after 1 s) against real downtime, and
    the time to converge of every case. Returns what happened, for the output."""
    if plt is None:
        return "no picture: matplotlib is not installed (pip install 'migd[bench]', or pip install matplotlib)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5.5), dpi=80)
    done = [r for r in results if r["status"] == "completed" and r["downtime"]]
    values = [v for r in done for v in (r["downtime"], r["expected"], r["worst_expected"]) if v]
    lo, hi = max(0.5, min(values or [1]) / 1.5), max(values or [300]) * 1.5
    xs = [lo * 1.05 ** i for i in range(200) if lo * 1.05 ** i <= hi] + [hi]
    ax1.plot(xs, xs, "k-", lw=0.8, label="exact")
    bound = [SMALL_MS if x < 20 else 0.25 * x for x in xs]
    ax1.fill_between(xs, [max(lo / 2, x - b) for x, b in zip(xs, bound, strict=True)],
                     [x + b for x, b in zip(xs, bound, strict=True)], color="g", alpha=0.15,
                     label="±25 % (±5 ms below 20 ms)")
    ax1.plot(xs, [x * 2 for x in xs], "k:", lw=0.8, label="×2 / ÷2")
    ax1.plot(xs, [x / 2 for x in xs], "k:", lw=0.8)
    for limit, marker in ((300, "o"), (50, "s")):
        sel = [r for r in done if r["limit"] == limit]
        ax1.scatter([r["downtime"] for r in sel], [r["expected"] for r in sel], marker=marker,
                    label=f"at switch-over, limit {limit} ms")
        late = [r for r in sel if r["worst_expected"]]
        ax1.scatter([r["downtime"] for r in late], [r["worst_expected"] for r in late], marker="x",
                    label=f"worst after 1 s, limit {limit} ms")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("real downtime (ms)")
    ax1.set_ylabel("x-migd-expected-downtime (ms)")
    ax1.set_title("expected vs real downtime")
    ax1.legend(fontsize=7)
    names = [r["case"].replace("random,rate=", "").replace(",wss=", "/") for r in results]
    times = [(r["total"] or 0) / 1000 if r["status"] == "completed" else 0 for r in results]
    colors = ["tab:blue" if r["status"] == "completed" else "tab:red" for r in results]
    ax2.barh(range(len(results)), [t if t else 0.05 for t in times], color=colors)
    for i, r in enumerate(results):
        if r["status"] != "completed":
            ax2.text(0.1, i, f"{r['status']} ({r['states'].split('>')[-1] if r['states'] else '-'})",
                     va="center", fontsize=6)
    ax2.set_yticks(range(len(results)))
    ax2.set_yticklabels(names, fontsize=6)
    ax2.invert_yaxis()
    ax2.set_xlabel("time to converge: total time (s); red = did not complete")
    ax2.set_title("workload:max-bandwidth:downtime-limit")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"picture: {path} ({path.stat().st_size // 1024} KiB)"


def cpu_times() -> list[int] | None:
    """The machine's CPU times from /proc/stat (jiffies: user, nice, system, idle, iowait, irq,
    softirq, steal), or None where it cannot be read."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """% of the machine's CPU time the host took (steal) between two readings: a case run while
    the host took its CPUs away measured the host as much as migd."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    spent = [b - a for a, b in zip(before[:8], after[:8], strict=True)]
    total = sum(spent)
    return round(100 * spent[7] / total, 1) if total > 0 else None


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="512M")
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK)} cases of the matrix")
    ap.add_argument("--cases", help="';'-separated cases instead of the matrix")
    ap.add_argument("--no-anchor", action="store_true", help="without QEMU's hardest anchor case")
    ap.add_argument("--timeout", type=float, default=20.0, help="s before a case is cancelled")
    ap.add_argument("--keep", action="store_true", help="keep the daemons' logs (printed path)")
    ap.add_argument("--trace", action="store_true", help="print every 10th sample (s, expected, state, eta)")
    ap.add_argument("--phases", action="store_true", help="print each case's downtime phases")
    ap.add_argument("--set", action="append", default=[], help="extra parameter name=value, every case")
    ap.add_argument("--png", default=str(HERE / "scenarios.png"), help="'' for none")
    ap.add_argument("--json", help="write the results there")
    ap.add_argument("--netdelay", action="store_true", help="then run bench/bench_netdelay.py (root)")
    args = ap.parse_args()
    extra = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    memory = parse_size(args.memory)
    cases = args.cases.split(";") if args.cases else list(QUICK if args.quick else MATRIX)
    runs: list[tuple[str, dict[str, Any]]] = [(c, extra) for c in cases]
    if not args.no_anchor and not args.cases:
        runs.append((ANCHOR, {**extra, "x-migd-auto-throttle": True}))
    tmp = Path(tempfile.mkdtemp(prefix="migd-scen-", dir="/dev/shm"))
    cols = ("case", "status", "digest", "total", "downtime", "expected", "ratio", "worst_after_1s",
            "sent_mb", "states", "actions", "stall_ms", "final_cpu", "dest", "steal_pct")
    print(f"# {len(runs)} cases, {args.memory} guest, unix socket, timeout {args.timeout:g} s; "
          f"load average {Path('/proc/loadavg').read_text().split()[0]} at the start")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    results: list[dict[str, Any]] = []
    try:
        for i, (case, params) in enumerate(runs):
            run_dir = tmp / f"case{i}"
            run_dir.mkdir()
            before = cpu_times()
            r = await one_case(run_dir, memory, case, args.timeout, params)
            r["steal_pct"] = steal_share(before, cpu_times())
            if params is not extra:
                r["case"] += " +auto-throttle"
            results.append(r)
            print("| " + " | ".join(str(r[c]) for c in cols) + " |", flush=True)
            if args.trace:
                print(f"  trace: {r['trace']}", flush=True)
            if args.phases or r["error"]:
                print(f"  phases: {r['phases']} error: {r['error']}", flush=True)
    finally:
        if args.keep:
            print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    done = [r for r in results if r["status"] == "completed"]
    held = [r for r in done if r["downtime"] and r["expected"] is not None
            and error_factor(r["expected"], r["downtime"]) <= 1.25]
    early = [r for r in done if r["worst_after_1s"] is None or r["worst_after_1s"] <= 2]
    over = [r["case"] for r in done if r["downtime"] and r["downtime"] > r["limit"]]
    print(f"# completed {len(done)}/{len(results)}; estimate at the switch-over within ±25 % (or 5 ms): "
          f"{len(held)}/{len(done)}; within ×2 after the first second: {len(early)}/{len(done)}; "
          f"downtime above the limit: {over or 'none'}")
    print(f"# load average {Path('/proc/loadavg').read_text().split()[0]} at the end (2 shared cores)")
    if args.png:
        print("# " + draw(results, Path(args.png), f"migd scenarios, {args.memory}, unix socket, "
                          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("# TCP with 10 and 50 ms of delay each way (network namespaces, root): "
          "sudo python3 bench/bench_netdelay.py --delays 0,10,50 (tests/test_netfault.py runs them in CI)")
    if args.netdelay:
        subprocess.run([sys.executable, str(HERE / "bench_netdelay.py"), "--delays", "0,10,50"], check=False)
    return 0 if len(done) == len(results) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
