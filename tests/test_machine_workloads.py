"""Workload specs and what the workloads really write."""

from __future__ import annotations

import time
import zlib

import numpy as np
import pytest

from migd.config import DriveConfig, MachineConfig
from migd.events import EventSink
from migd.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.machine.workloads import (
    COUNTER_AREA,
    CounterCorrupt,
    WorkloadError,
    WorkloadSpec,
    _make_pool,
    check_counter,
    counter_checksum,
    parse_workload,
)

MiB = 1 << 20


def wait_for(pred, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


@pytest.mark.parametrize("text,spec", [
    ("idle", WorkloadSpec()),
    ("random", WorkloadSpec("random", rate=64 * MiB)),
    ("random,rate=100M,wss=8M,seed=7", WorkloadSpec("random", rate=100 * MiB, wss=8 * MiB, seed=7)),
    (" random , seed=3 ", WorkloadSpec("random", rate=64 * MiB, seed=3)),
    ("counter", WorkloadSpec("counter", rate=4 * MiB)),
    ("counter,rate=1M,disk-rate=512K", WorkloadSpec("counter", rate=MiB, disk_rate=512 << 10)),
    ("disk-rate=2M", WorkloadSpec(disk_rate=2 * MiB)),
    ("random,rate=1G", WorkloadSpec("random", rate=1 << 30)),
    # the size grammar of migd.units: decimals, B/iB, a bare number is bytes
    ("random,rate=1.5M", WorkloadSpec("random", rate=3 * MiB // 2)),
    ("random,rate=64MiB,wss=8mb", WorkloadSpec("random", rate=64 * MiB, wss=8 * MiB)),
    ("counter,rate=1000", WorkloadSpec("counter", rate=1000)),
    ("counter,rate=1000B", WorkloadSpec("counter", rate=1000)),
    ("disk-rate=0.5KiB", WorkloadSpec(disk_rate=512)),
    ("random,compress=0.5", WorkloadSpec("random", rate=64 * MiB, compress=0.5)),
])
def test_parse(text, spec):
    assert parse_workload(text) == spec
    assert parse_workload(str(spec)) == spec  # the canonical form parses back


@pytest.mark.parametrize("text,message", [
    ("", "empty item"),
    ("random,", "empty item"),
    ("busy", "unknown kind 'busy'"),
    ("random,rate=fast", "invalid rate 'fast' \\(expected a number with an optional K, M, G, T, P or E suffix\\)"),
    ("random,rate=1.5", "invalid rate '1.5' \\(a fraction of a byte\\)"),
    ("random,rate=-1M", "invalid rate '-1M'"),
    ("random,wss=lots", "invalid wss 'lots'"),
    ("disk-rate=1Q", "invalid disk-rate '1Q'"),
    ("random,wss=1.5K", "wss 1536 must be a positive multiple of 4096"),
    ("random,rate=0", "rate must be positive"),
    ("random,wss=1000", "multiple of 4096"),
    ("random,seed=-1", "invalid seed"),
    ("random,rate=1M,rate=2M", "'rate' given twice"),
    ("idle,rate=1M", "unknown option 'rate' for 'idle'"),
    ("counter,wss=1M", "unknown option 'wss'"),
    ("rate", "unknown kind 'rate'"),
    ("random,rate", "must be key=value"),
    ("random," + "x" * 200, "longer than 128"),
    ("random,compress=1", "invalid compress '1' \\(expected a fraction, 0 <= R < 1\\)"),
    ("random,compress=half", "invalid compress 'half'"),
    ("counter,compress=0.5", "unknown option 'compress' for 'counter'"),
])
def test_parse_errors(text, message):
    with pytest.raises(WorkloadError, match=message):
        parse_workload(text)


def make(workload="idle", memory=16 * MiB, smp=1, drives=(), initial=RunState.RUNNING, mem_path=None):
    rs = RunStateMachine(initial)
    cfg = MachineConfig(memory=memory, smp=smp, workload=workload, mem_path=mem_path,
                        drives=[DriveConfig(file=d) for d in drives])
    return Machine(cfg, rs, EventSink())


def test_machine_refuses_workloads_that_do_not_fit():
    with pytest.raises(WorkloadError, match="larger than ram0"):
        make("random,wss=32M")
    with pytest.raises(WorkloadError, match="counter needs"):
        make("counter", memory=COUNTER_AREA * 4096, smp=2)
    with pytest.raises(WorkloadError, match="needs at least one drive"):
        make("disk-rate=1M")
    m = make()
    with pytest.raises(WorkloadError):
        m.set_workload("random,wss=1G")
    assert m.workload.spec.kind == "idle"  # unchanged
    m.shutdown()


def test_random_writes_nonzero_pages_inside_wss_and_marks_them_after():
    m = make("random,rate=32M,wss=4M,seed=5")
    ram0 = m.ram.get("ram0")
    ram0.set_logging(True)
    m.start()
    wait_for(lambda: m.vcpus[0].stats.bytes_written >= 2 * MiB)
    m.vm_stop()
    written = np.flatnonzero(ram0.pages.any(axis=1))
    assert written.size > 100 and written.max() < 1024  # only the first 4 MiB
    assert np.array_equal(np.flatnonzero(ram0.take_dirty()), written)  # every written page marked
    assert (ram0.pages[written] != 0).mean() > 0.99  # non-zero random bytes (stamp word aside)
    # distinct contents: the first word is a unique stamp per write
    assert len(np.unique(ram0.words[written, 0])) == written.size
    # pacing follows run time, never ahead of the requested rate
    st = m.vcpus[0].stats
    assert st.bytes_written <= 32 * MiB * (st.run_time + 0.02)
    m.shutdown()


def test_random_rate_is_near_the_request_and_query_reports_it():
    m = make("random,rate=50M", memory=64 * MiB, smp=2)
    m.start()
    wait_for(lambda: all(v.stats.run_time > 1.0 for v in m.vcpus))
    info = m.workload_info()
    assert info["rate"] == 50 * MiB and info["kind"] == "random" and len(info["vcpus"]) == 2
    # loose on purpose (loaded CI machine): the bench measures the 10 % figure
    assert 0.5 * 50 * MiB < info["achieved-rate"] < 1.2 * 50 * MiB
    assert info["largest-stall-ms"] >= 9
    m.shutdown()


def test_counter_keeps_a_consistent_counter_in_ram_and_detects_corruption():
    m = make("counter,rate=2M", smp=2)
    m.start()
    wait_for(lambda: all(isinstance(v.wstate, object) and getattr(v.wstate, "counter", 0) > 100 for v in m.vcpus))
    m.vm_stop()
    ram0 = m.ram.get("ram0")
    for v in m.vcpus:
        c = check_counter(ram0, v.index, expect=v.wstate.counter)
        assert c == v.wstate.counter and ram0.words[v.index * COUNTER_AREA, 2] == counter_checksum(c)
    info = m.workload_info()
    assert all(x["consistent"] and x["counter"] == x["ram-counter"] for x in info["vcpus"])
    # a stale trail page (what a lost page in a migration looks like) is detected by the guest itself
    ram0.pages[1] ^= 0xFF
    with pytest.raises(CounterCorrupt, match="trail"):
        check_counter(ram0, 0)
    m.vm_start()
    wait_for(lambda: m.vcpus[0].error is not None)
    assert "trail pages" in m.vcpus[0].error
    n = m.vcpus[0].wstate.counter
    assert m.workload_info()["vcpus"][0]["error"]
    time.sleep(0.05)
    assert m.vcpus[0].wstate.counter == n  # a broken guest stops counting
    assert m.vcpus[1].error is None
    m.shutdown()


def test_workload_switch_at_run_time(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 * MiB))
    m = make("idle", drives=[str(img)])
    m.start()
    m.set_workload("random,rate=8M,disk-rate=4M")
    wait_for(lambda: m.vcpus[0].stats.bytes_written > MiB and m.vcpus[0].stats.disk_bytes_written > 512 << 10)
    m.set_workload("idle")
    wait_for(lambda: m.vcpus[0].stats.bytes_written == 0 and m.vcpus[0].stats.slices > 3)
    m.vm_stop()
    assert m.drives[0].bytes_written > 512 << 10
    m.flush_drives()
    assert img.read_bytes() != bytes(MiB)
    m.shutdown()


def test_counter_after_random_starts_clean_and_a_kept_counter_continues(tmp_path):
    m = make("random,rate=64M,wss=1M", mem_path=str(tmp_path / "ram"))
    m.start()
    wait_for(lambda: m.vcpus[0].stats.bytes_written > 2 * MiB)
    m.set_workload("counter,rate=1M")  # its area is full of random bytes: start from zero
    wait_for(lambda: getattr(m.vcpus[0].wstate, "counter", 0) > 20)
    assert m.vcpus[0].error is None
    m.vm_stop()
    kept = m.vcpus[0].wstate.counter
    m.shutdown()
    again = make("counter,rate=1M", mem_path=str(tmp_path / "ram"))  # the same RAM file
    again.start()
    wait_for(lambda: getattr(again.vcpus[0].wstate, "counter", 0) > kept + 5)
    assert again.vcpus[0].error is None
    again.shutdown()


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75])
def test_random_compress_makes_pages_compressible_to_the_ratio(ratio: float) -> None:
    pool = _make_pool(11, ratio)
    page = pool[3].tobytes()
    assert len(page) == 4096 and pool[3].all()  # never a zero byte, so never a zero page
    size = len(zlib.compress(page, 1)) / 4096
    assert ratio * 0.9 <= 1 - size + 0.02 <= ratio + 0.05, (ratio, size)
