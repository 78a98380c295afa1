"""The guest's downtime through a live migd relay against a direct QEMU -> QEMU migration, same run.

Direct: QEMU source -> QEMU destination. Relay: QEMU source -> migd (``--incoming``, no machine
options) -> QEMU destination, the relay's ``migrate`` issued as soon as it receives the machine,
while its incoming migration is still active (docs/INTEROP.md). The guest is the tests' boot-sector
guest (tests/qemu_guest.py: 32 MiB, dirties 320 KiB per timer tick); the source's max-bandwidth is
capped (--bandwidth) so the relay has a live migration to forward; runs alternate direct and relay.
Needs qemu-system-x86_64, as and ld.

    python3 bench/bench_relay.py [--runs 3] [--bandwidth 8M] [--return-path]

Per run it prints: the source QEMU's ``downtime`` (query-migrate), migd's own ``downtime`` (relay),
the guest's wall-clock downtime (the source's STOP event to the destination's RESUME event, both
stamped by the host clock), for the relay the STOP to its incoming completion (its log line's
millisecond stamp: QEMU's last pass arriving and loaded), the total time (migrate to RESUME) and the destination's query-migrate
status. The guest counter's gap cannot show downtime: it counts ticks of QEMU's virtual clock,
which stops with the guest; the bench checks it continues from the stopped value instead.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import Migd, MigdError, wait_for  # noqa: E402
from qemu_guest import Qemu, build_floppy, missing_tools  # noqa: E402


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def stamp(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


def log_stamp(log: str, text: str) -> float | None:
    """The host-clock time of the first migd log line containing ``text``."""
    for line in log.splitlines():
        if text in line:
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
            if m:
                return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
    return None


def one_run(work: Path, floppy: Path, accel: str, relay: bool, bandwidth: int, return_path: bool,
            n: int) -> dict[str, Any]:
    """One migration of a freshly booted guest, direct or through a relay; its figures."""
    tag = f"{'relay' if relay else 'direct'}{n}"
    src = Qemu(work, f"src-{tag}", floppy, accel=accel)
    dst = Qemu(work, f"dst-{tag}", floppy, "-incoming", f"unix:{work / f'{tag}.out'}", accel=accel)
    mid: Migd | None = None
    try:
        src.wait_counting()
        caps = [{"capability": "return-path", "state": return_path}]
        src.cmd("migrate-set-capabilities", capabilities=caps)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        target = work / f"{tag}.out"
        if relay:
            mid = Migd(work, f"relay-{tag}", "--incoming", f"unix:{work / f'{tag}.in'}")
            mid.cmd("migrate-set-capabilities", capabilities=caps)
            target = work / f"{tag}.in"
        t0 = time.monotonic()
        src.cmd("migrate", uri=f"unix:{target}")
        live = True
        if mid is not None:
            wait_for(lambda: "return" in mid.cmd_raw("x-migd-query-foreign"), 30, 0.002, "the relay to receive")
            live = mid.cmd("query-migrate").get("status") == "active"
            mid.cmd("migrate", uri=f"unix:{work / f'{tag}.out'}")
        src_info = src.wait_migration()
        stop = src.wait_event("STOP")
        resume = dst.wait_event("RESUME")
        total = time.monotonic() - t0
        mid_info = mid.wait_for(lambda: mid.cmd("query-migrate") if mid.cmd("query-migrate").get("status")
                                in ("completed", "failed") else {}, 60, "the relay") if mid is not None else {}
        dst_info = dst.cmd("query-migrate")
        loaded = log_stamp(mid.log(), "incoming migration status=completed") if mid is not None else None
        stopped_at = src.counter()
        try:
            continues = dst.wait_for_counter(stopped_at + 2) >= stopped_at + 2
        except MigdError as exc:  # reported in the row, and the log kept, rather than ending the bench
            continues = False
            print(f"{tag}: the destination's counter did not continue: {exc}; dst counter {dst.counter()}, "
                  f"status {dst.status()}", flush=True)
        return {"kind": "relay" if relay else "direct", "src-downtime": src_info.get("downtime"),
                "relay-downtime": mid_info.get("downtime"), "guest-downtime": (stamp(resume) - stamp(stop)) * 1000,
                "total": total * 1000, "dst-status": dst_info.get("status"), "live": live,
                "counter-continues": continues, "src-status": src_info.get("status"),
                "relay-status": mid_info.get("status"),
                # the source's STOP to the relay's incoming completion: QEMU's last pass arriving and loaded
                "stop-to-loaded": None if loaded is None else (loaded - stamp(stop)) * 1000}
    finally:
        for vm in (src, dst):
            vm.kill()
        if mid is not None:
            mid.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bandwidth", default="8M", help="the source QEMU's max-bandwidth (bytes/s)")
    ap.add_argument("--return-path", action="store_true", help="the return-path capability on both sources")
    args = ap.parse_args()
    missing = missing_tools()
    if missing:
        print(f"skipped: {missing}")
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_relay.") as tmp:
        work = Path(tmp)
        floppy = build_floppy(work)
        probe = Qemu(work, "probe", floppy)
        accel = probe.accel
        probe.kill()
        rows: list[dict[str, Any]] = []
        for n in range(args.runs):
            for relay in (False, True):
                row = one_run(work, floppy, accel, relay, parse_size(args.bandwidth), args.return_path, n)
                rows.append(row)
                print(f"{row['kind']:6}  source downtime {row['src-downtime']!s:>4} ms  "
                      f"migd downtime {row['relay-downtime']!s:>4} ms  "
                      f"guest STOP->RESUME {row['guest-downtime']:7.1f} ms  total {row['total']:7.1f} ms  "
                      f"dst {row['dst-status']}  live {row['live']}  counter continues {row['counter-continues']}"
                      + ("" if row["stop-to-loaded"] is None else
                         f"  STOP->relay loaded {row['stop-to-loaded']:.0f} ms"),
                      flush=True)
        print(f"\naccel {accel}, max-bandwidth {args.bandwidth}/s, return-path {args.return_path}, "
              f"{args.runs} runs each; medians:")
        for kind in ("direct", "relay"):
            mine = [r for r in rows if r["kind"] == kind]
            gd = statistics.median(r["guest-downtime"] for r in mine)
            sd = statistics.median(r["src-downtime"] or 0 for r in mine)
            tt = statistics.median(r["total"] for r in mine)
            extra = ""
            if kind == "relay":
                extra = f"  migd downtime {statistics.median(r['relay-downtime'] or 0 for r in mine):.0f} ms"
            print(f"  {kind:6}  guest STOP->RESUME {gd:7.1f} ms  source downtime {sd:5.0f} ms  "
                  f"total {tt:7.1f} ms{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
