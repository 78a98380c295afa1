#!/usr/bin/env python3
"""Soak: many live migrations of a running ``counter`` guest out of one long-lived daemon, watching it
for leaks (issue 11 item 5).

A daemon that migrates for weeks must not gain a file descriptor, a thread or resident memory per
migration. Each round, the long-lived source migrates its running counter guest to a fresh destination
(``-S``), the destination's RAM digest and counters are compared with the source's, the destination
quits, and the source resumes (``cont`` from ``postmigrate``, as QEMU allows) and must keep counting
from where it stopped. After each round the fd count, thread count and RSS of the source (from /proc)
are sampled, and those of the destination just before it quits; a table is printed, then whether
anything grew after the warm-up rounds.

Why not two long-lived daemons passing the guest back and forth: ``--incoming`` is once per process
(QEMU's rule: a second ``migrate-incoming`` is refused), so the receiving side is a new process every
round; its figures show what one load costs, not growth.

    python3 bench/bench_soak.py [--rounds 20] [--memory 128M] [--transport unix|tcp] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench_throughput import Daemon

T = TypeVar("T")
WARMUP = 3  # rounds whose figures only set the baseline (caches, lazily started executor threads)
RSS_SLACK_KIB = 4096  # RSS may wander this much past the baseline's maximum without counting as growth
ROUND_TIMEOUT = 60.0  # seconds for any one wait


@dataclass
class Sample:
    """One process's footprint, from /proc."""

    fds: int
    threads: int
    rss_kib: int


@dataclass
class Round:
    """What one round measured."""

    index: int
    seconds: float
    downtime_ms: int
    src: Sample
    dst: Sample


def sample(pid: int) -> Sample:
    """fd count, thread count and VmRSS of ``pid`` (main thread)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return Sample(len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"][0]), int(fields["VmRSS"][0]))


def poll(fn: Callable[[], T | None], what: str, timeout: float = ROUND_TIMEOUT) -> T:
    """Call ``fn`` until it returns something not None/False; fail after ``timeout`` s (main thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def counters(d: Daemon) -> list[int]:
    return [int(v["counter"]) for v in d.cmd("x-migd-query-workload")["vcpus"]]


def digests(d: Daemon) -> dict[str, str]:
    return {b["name"]: b["digest"] for b in d.cmd("x-migd-ram-digest")["blocks"]}


def finished(d: Daemon) -> dict[str, Any] | None:
    """query-migrate once it ended; a failure or cancel raises (main thread)."""
    info: dict[str, Any] = d.cmd("query-migrate")
    status = info.get("status")
    if status in ("failed", "cancelled"):
        raise RuntimeError(f"{d.name}: migration {status}: {info}")
    return info if status == "completed" else None


def one_round(index: int, work: Path, src: Daemon, memory: str, smp: str, transport: str) -> Round:
    """Migrate the source's guest to a fresh destination, check it, resume the source (main thread)."""
    if transport == "unix":
        listen = f"unix:{work}/mig{index}.sock"
    else:
        listen = "tcp:127.0.0.1:0"
    dst = Daemon(work, f"dst{index}", "-m", memory, "--smp", smp, "-S", "--incoming", listen)
    try:
        uri = listen
        if transport == "tcp":
            port = poll(lambda: dst.cmd("query-migrate").get("socket-address"), "the destination's port")
            uri = f"tcp:127.0.0.1:{port[0]['port']}"
        began = time.monotonic()
        src.cmd("migrate", uri=uri)
        info = poll(lambda: finished(src), f"round {index} to complete")
        poll(lambda: finished(dst), f"round {index}'s destination to complete")
        seconds = time.monotonic() - began
        at_stop = counters(src)
        if counters(dst) != at_stop or digests(dst) != digests(src):
            raise RuntimeError(f"round {index}: the destination's guest differs from the source's")
        dst_sample = sample(dst.proc.pid)
    finally:
        dst.stop()
    src.cmd("cont")
    poll(lambda: all(n > s for n, s in zip(counters(src), at_stop, strict=True)),
         f"round {index}: the resumed source to keep counting")
    return Round(index, seconds, int(info.get("downtime", -1)), sample(src.proc.pid), dst_sample)


def growth(rounds: list[Round]) -> list[str]:
    """What the source gained after the warm-up: one line per figure that grew (empty: nothing did)."""
    if len(rounds) <= WARMUP:
        return []
    base, rest = rounds[:WARMUP], rounds[WARMUP:]
    found = []
    for name, slack in (("fds", 0), ("threads", 0), ("rss_kib", RSS_SLACK_KIB)):
        ceiling = max(getattr(r.src, name) for r in base) + slack
        last = getattr(rest[-1].src, name)
        peak = max(getattr(r.src, name) for r in rest)
        if last > ceiling:
            found.append(f"{name}: {ceiling - slack} in the warm-up rounds, {last} after round "
                         f"{rest[-1].index} (peak {peak})")
    return found


def print_table(rounds: list[Round]) -> None:
    print("| round | s | downtime ms | src fds | src threads | src RSS MiB | dst fds | dst threads | dst RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rounds:
        print(f"| {r.index} | {r.seconds:.2f} | {r.downtime_ms} | {r.src.fds} | {r.src.threads} | "
              f"{r.src.rss_kib / 1024:.1f} | {r.dst.fds} | {r.dst.threads} | {r.dst.rss_kib / 1024:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--smp", default="2")
    parser.add_argument("--workload", default="counter,rate=4M")
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--json", type=Path, help="also write the rounds here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="migd-soak-"))
    src = Daemon(work, "src", "-m", args.memory, "--smp", args.smp, "--workload", args.workload)
    rounds: list[Round] = []
    try:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
        poll(lambda: min(counters(src)) > 0, "the counter guest to start")
        start = sample(src.proc.pid)
        print(f"source before any migration: fds {start.fds}, threads {start.threads}, "
              f"RSS {start.rss_kib / 1024:.1f} MiB", flush=True)
        for i in range(1, args.rounds + 1):
            rounds.append(one_round(i, work, src, args.memory, args.smp, args.transport))
            r = rounds[-1]
            print(f"round {i}: {r.seconds:.2f} s, src fds {r.src.fds} threads {r.src.threads} "
                  f"RSS {r.src.rss_kib / 1024:.1f} MiB", flush=True)
    finally:
        src.stop()
        shutil.rmtree(work, ignore_errors=True)
    print()
    print_table(rounds)
    grew = growth(rounds)
    print()
    if grew:
        print("GREW after the warm-up:")
        for line in grew:
            print(f"  {line}")
    else:
        print(f"nothing grew: fds, threads and RSS of the source stayed within the first {WARMUP} rounds' "
              f"figures (RSS slack {RSS_SLACK_KIB // 1024} MiB) over {len(rounds)} migrations")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rounds], indent=1))
    return 1 if grew else 0


if __name__ == "__main__":
    sys.exit(main())
