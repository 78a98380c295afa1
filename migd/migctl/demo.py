"""``migctl demo``: the whole product in one command on a fresh machine.

Starts a source migd running a workload and a paused-on-arrival destination (``-S``), migrates with the
live display, then proves the result rather than trusting it: the destination's RAM digest must equal
the source's (both frozen at that point), and after ``cont`` the guest must keep running its workload
on the destination. Every process and file it made is removed, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from typing import Any

from rich.table import Table

from migd.migctl.client import Client, MigctlError
from migd.migctl.commands import follow
from migd.migctl.display import human_bytes, human_ms
from migd.migctl.output import Output
from migd.migctl.procs import DaemonProcess
from migd.migctl.values import ValueParseError, parse_size
from migd.migctl.watch import Limits
from migd.units import MiB

DEFAULT_RATE = 64 << 20  # the workload's dirty rate on an unlimited link
MIN_RATE = 256 << 10
STALL_CANCEL = 20.0  # seconds without a new low of remaining before the demo gives up


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", default="1G", help="guest RAM of the demo machine (default 1G)")
    p.add_argument("--workload", help="workload spec (default random,rate=64M, or a quarter of --bandwidth)")
    p.add_argument("--bandwidth", default="0", help="max-bandwidth, bytes/s with K/M/G (default 0 = unlimited)")
    p.add_argument("--downtime", type=int, metavar="MS", help="downtime-limit in ms (default: migd's, 300)")
    p.add_argument("--transport", choices=("unix", "tcp"), default="unix", help="migration channel")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="cancel the migration after S seconds (default 30 s + 3 x RAM / bandwidth)")
    p.add_argument("--keep-going", type=float, default=1.0, metavar="S", help=argparse.SUPPRESS)


def demo_workload(bandwidth: int) -> str:
    """A workload the link can outrun: a quarter of the bandwidth (the default rate when unlimited)."""
    rate = DEFAULT_RATE if bandwidth <= 0 else max(MIN_RATE, min(DEFAULT_RATE, bandwidth // 4))
    return f"random,rate={rate}"


def demo_time_limit(memory: int, bandwidth: int) -> float:
    """Generous for a converging migration (three full copies of RAM), finite for one that is not."""
    return 30.0 + (3.0 * memory / bandwidth if bandwidth > 0 else 30.0)


def run_demo(args: argparse.Namespace, out: Output) -> int:
    try:
        memory = parse_size(args.memory, MiB)  # checked as migd's -m reads it: a bare number is MiB
        bandwidth = parse_size(args.bandwidth)
    except ValueParseError as exc:
        out.error(str(exc))
        return 2
    if args.workload is None:
        args.workload = demo_workload(bandwidth)
    if args.time_limit is None:
        args.time_limit = demo_time_limit(memory, bandwidth)
    try:
        return asyncio.run(Demo(args, out).run())
    except KeyboardInterrupt:
        out.error("demo interrupted; cleaned up")
        return 130


class DemoFailed(MigctlError):
    pass


class Demo:
    def __init__(self, args: argparse.Namespace, out: Output) -> None:
        self.args = args
        self.out = out
        self.workdir = tempfile.mkdtemp(prefix="migctl-demo-")
        common = ["-m", args.memory]
        self.src = DaemonProcess("src", self.workdir, [*common, "--workload", args.workload])
        self.dst = DaemonProcess("dst", self.workdir, [*common, "-S", "--incoming", self._listen_uri()])

    def _listen_uri(self) -> str:
        if self.args.transport == "tcp":
            return "tcp:127.0.0.1:0"
        return f"unix:{self.workdir}/migration.sock"

    async def run(self) -> int:
        asyncio.get_running_loop().set_exception_handler(_quiet_disconnects)
        try:
            code = await self._demo()
        except MigctlError as exc:
            self.out.error(f"demo failed: {exc}")
            code = 1
        finally:
            await asyncio.gather(self.src.stop(), self.dst.stop(), return_exceptions=True)
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def step(self, text: str) -> None:
        self.out.line(f"[demo] {text}")

    async def _demo(self) -> int:
        args = self.args
        self.step(f"starting source ({args.memory}, workload {args.workload}) and destination in {self.workdir}")
        self.src.start()
        self.dst.start()
        src, dst = await asyncio.gather(self.src.connect(), self.dst.connect())
        for client in (src, dst):
            await client.execute("migrate-set-capabilities",
                                 {"capabilities": [{"capability": "events", "state": True}]})
        params: dict[str, Any] = {"max-bandwidth": parse_size(args.bandwidth)}
        if args.downtime is not None:
            params["downtime-limit"] = args.downtime
        await src.execute("migrate-set-parameters", params)
        await self._wait_workload_progress(src, "source")
        uri = await self._target_uri(dst)
        self.step(f"migrating to {uri}")
        started = time.monotonic()
        await src.execute("migrate", {"uri": uri})
        limits = Limits(time_limit=args.time_limit, stall_cancel=STALL_CANCEL)
        code, result = await follow(src, self.out, limits=limits)
        wall = time.monotonic() - started
        if code != 0:
            why = f" ({result.gave_up})" if result.gave_up else ""
            raise DemoFailed(f"the migration ended '{result.info.get('status')}'{why}")
        await self._wait_status(dst, "completed")
        await self._verify_digest(src, dst)
        run = await dst.execute("query-status")
        if run.get("status") != "paused":
            raise DemoFailed(f"destination is '{run.get('status')}' after the load, expected 'paused' (-S)")
        await dst.execute("cont")
        run = await dst.execute("query-status")
        if not run.get("running"):
            raise DemoFailed(f"destination did not start: '{run.get('status')}'")
        await self._wait_workload_progress(dst, "destination")
        self._summary(result.info, result.expected_downtime, wall, params)
        self.step("success: RAM identical on both sides, guest running on the destination")
        return 0

    async def _target_uri(self, dst: Client) -> str:
        if self.args.transport == "unix":
            return f"unix:{self.workdir}/migration.sock"
        info = await dst.execute("query-migrate")
        for addr in info.get("socket-address") or []:
            if addr.get("type") == "inet":
                return f"tcp:{addr['host']}:{addr['port']}"
        raise DemoFailed(f"destination reports no TCP listening address: {info}")

    async def _wait_status(self, client: Client, wanted: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = await client.execute("query-migrate")
            status = info.get("status")
            if status == wanted:
                return
            if status in ("failed", "cancelled"):
                raise DemoFailed(f"destination migration {status}: {info.get('error-desc', '')}")
            if time.monotonic() > deadline:
                raise DemoFailed(f"destination still '{status}' after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def _verify_digest(self, src: Client, dst: Client) -> None:
        a = await src.execute("x-migd-ram-digest")
        b = await dst.execute("x-migd-ram-digest")
        if a != b:
            raise DemoFailed(f"RAM differs after the migration: {_digest_diff(a, b)}")
        self.step(f"RAM digest equal on both sides: {_digest_text(a)}")

    async def _wait_workload_progress(self, client: Client, where: str, timeout: float = 30.0) -> None:
        """The guest is alive when its workload's own progress counter moves."""
        first = _workload_progress(await client.execute("x-migd-query-workload"))
        deadline = time.monotonic() + timeout
        while True:
            await asyncio.sleep(0.1)
            now = _workload_progress(await client.execute("x-migd-query-workload"))
            if now > first:
                self.step(f"guest workload progressing on the {where}")
                return
            if time.monotonic() > deadline:
                raise DemoFailed(f"the workload on the {where} made no progress in {timeout:.0f} s")

    def _summary(self, info: dict[str, Any], expected: int | None, wall: float, params: dict[str, Any]) -> None:
        ram = info.get("ram") or {}
        table = Table(title="demo result", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")
        table.add_row("total time", f"{human_ms(info.get('total-time'))} (wall {wall:.2f} s)")
        table.add_row("downtime", f"{human_ms(info.get('downtime'))}, expected {human_ms(expected)}, "
                      f"limit {params.get('downtime-limit', 300)} ms")
        table.add_row("throughput", f"{ram.get('mbps', 0):.0f} Mbit/s")
        table.add_row("transferred", f"{human_bytes(ram.get('transferred'))} of {human_bytes(ram.get('total'))} RAM")
        table.add_row("pages", f"{ram.get('normal', 0)} data, {ram.get('duplicate', 0)} zero, "
                      f"{ram.get('dirty-sync-count', 0)} passes")
        for name, ms in (info.get("x-migd-downtime-phases") or {}).items():
            table.add_row(f"  phase {name}", f"{ms:.1f} ms" if isinstance(ms, int | float) else str(ms))
        if self.out.json_mode:
            self.out.data({"migration": info, "expected-downtime": expected, "wall-seconds": wall})
        else:
            self.out.show(table)


def _quiet_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A daemon that exits (quit, or a destination after a cancel) ends its QMP session with EOF;
    qemu.qmp leaves that in a future nobody reads. That is expected here, anything else is reported."""
    if isinstance(context.get("exception"), EOFError | ConnectionResetError | BrokenPipeError):
        return
    loop.default_exception_handler(context)


def _workload_progress(answer: Any) -> float:
    """A number that grows while the guest runs: the workload's bytes (or slices) done so far."""
    if isinstance(answer, dict):
        for key in ("slices", "seq", "bytes-written", "counter"):
            value = answer.get(key)
            if isinstance(value, int | float):
                return float(value)
        total = 0.0
        for value in answer.values():
            if isinstance(value, dict | list):
                total += _workload_progress(value)
        return total
    if isinstance(answer, list):
        return sum(_workload_progress(v) for v in answer)
    return 0.0


def _blocks(answer: Any) -> dict[str, Any]:
    blocks = answer.get("blocks") if isinstance(answer, dict) else None
    if not isinstance(blocks, list):
        return {"?": answer}
    return {str(b.get("name")): b.get("digest") for b in blocks if isinstance(b, dict)}


def _digest_text(answer: Any) -> str:
    return ", ".join(f"{name} {str(digest)[:16]}" for name, digest in _blocks(answer).items())


def _digest_diff(src: Any, dst: Any) -> str:
    """Which blocks differ (or exist on one side only), in one line."""
    a, b = _blocks(src), _blocks(dst)
    parts = []
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            parts.append(f"block {name}: source {a.get(name, 'absent')} destination {b.get(name, 'absent')}")
    return "; ".join(parts)
