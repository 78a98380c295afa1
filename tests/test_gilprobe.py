"""The debug GIL probe (migd/gilprobe.py): off unless asked, and a thread holding the GIL in one long
C call is reported with its stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from migd.gilprobe import GilProbe, stall_record

ROOT = Path(__file__).resolve().parent.parent


def test_stall_record_names_busy_threads_busiest_first() -> None:
    me = threading.get_ident()
    other = threading.Thread(target=threading.Event().wait, args=(5,), name="idle-waiter", daemon=True)
    other.start()
    try:
        frames = sys._current_frames()
        assert other.ident is not None
        names = {me: "holder", other.ident: "idle-waiter"}
        cpu = {me: 0.004, other.ident: 0.0}  # the holder ran for the whole 5 ms stall; the waiter not at all
        rec = stall_record(0.005, 0.001, 12.5, cpu, frames, names)
    finally:
        other.join(0)
    assert rec["late_ms"] == 5.0 and rec["runq_ms"] == 1.0 and rec["t"] == 12.5
    assert list(rec["threads"]) == ["holder"]
    assert rec["threads"]["holder"]["cpu_ms"] == 4.0
    assert "test_stall_record_names_busy_threads_busiest_first" in " ".join(rec["threads"]["holder"]["stack"])


def _hold_gil(size: int) -> None:
    """One long C call that keeps the GIL: a bytes() copy of a large buffer. The sleep after it drops
    the GIL inside this function and stays here, so the probe's stack names it however late the probe
    gets a CPU (a short loop here was not enough under load: CI's run found the holder past it)."""
    bytes(memoryview(bytearray(size)))
    time.sleep(0.1)


def test_probe_reports_a_long_hold_with_its_stack(tmp_path: Path) -> None:
    out = open(tmp_path / "stalls.jsonl", "w", buffering=1)  # noqa: SIM115 - closed below
    probe = GilProbe(0.0005, out)
    probe.start()
    holder_seen = False
    try:
        for attempt in range(40):  # bounded: grows the hold until the probe saw it
            before = probe.stalls
            worker = threading.Thread(target=_hold_gil, args=((16 << 20) * (1 + attempt),), name="holder")
            worker.start()
            worker.join(60)
            if probe.stalls > before:
                lines = (tmp_path / "stalls.jsonl").read_text().splitlines()
                recs = [json.loads(line) for line in lines if "late_ms" in line]
                holder_seen = any("holder" in r["threads"] for r in recs)
                if holder_seen:
                    break
    finally:
        probe.stop()
        probe.join(10)
        out.close()
    assert holder_seen
    recs = [json.loads(line) for line in (tmp_path / "stalls.jsonl").read_text().splitlines()]
    held = [r for r in recs if "holder" in r.get("threads", {})]
    assert any("_hold_gil" in " ".join(r["threads"]["holder"]["stack"]) for r in held)


def test_probe_off_by_default() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MIGD_GIL_PROBE"}
    code = ("import threading; from migd.gilprobe import start_from_env; p = start_from_env(); "
            "print(p is None, [t.name for t in threading.enumerate()])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "True ['MainThread']"


def test_probe_on_from_env(tmp_path: Path) -> None:
    env = dict(os.environ, MIGD_GIL_PROBE="1", MIGD_GIL_PROBE_OUT=str(tmp_path / "x.jsonl"))
    code = ("import threading; from migd.gilprobe import start_from_env; p = start_from_env(); "
            "print(p is not None and p.is_alive(), p.threshold)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "True 0.0005"
