"""Device state: bytes <-> fields, the vmdesc description, validation, and carrying a guest across."""

from __future__ import annotations

import io
import json
import struct
import time

import numpy as np
import pytest

from migd.config import DriveConfig, MachineConfig
from migd.events import EventSink
from migd.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.machine.vmstate import VCPUDevice

MiB = 1 << 20


class Reader:
    """``read(n)``: exactly n bytes or an error, like the stream's reader."""

    def __init__(self, data: bytes) -> None:
        self.f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise EOFError(f"wanted {n} bytes, got {len(data)}")
        return data

    def left(self) -> int:
        return len(self.f.getbuffer()) - self.f.tell()


def wait_for(pred, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def make(workload="idle", memory=8 * MiB, smp=2, drives=(), initial=RunState.RUNNING):
    cfg = MachineConfig(memory=memory, smp=smp, workload=workload,
                        drives=[DriveConfig(file=d) for d in drives])
    return Machine(cfg, RunStateMachine(initial), EventSink())


def test_devices_in_order_and_descriptions_match_bytes(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    m = make(drives=[str(img)])
    devs = m.devices()
    assert [(d.idstr, d.instance_id) for d in devs] == [
        ("migd-machine", 0), ("vcpu", 0), ("vcpu", 1), ("migd-drive", 0), ("globalstate", 0)]
    for d in devs:
        data = d.save()
        desc = d.describe()
        assert desc["name"] == d.idstr and desc["instance_id"] == d.instance_id
        assert desc["version"] == d.version_id and desc["vmsd_name"]
        assert sum(f["size"] for f in desc["fields"]) == len(data)
        assert {f["type"] for f in desc["fields"]} <= {"uint32", "uint64", "buffer"}
        json.dumps(desc)  # JSON-able for the VMDESCRIPTION section
    machine = devs[0].save()
    assert struct.unpack(">QIII", machine) == (8 * MiB, 2, 4096, 1)
    m.shutdown()


def test_load_refuses_a_different_machine_and_changes_nothing():
    src, dst = make(smp=2), make(smp=1)
    with pytest.raises(ValueError, match="the source has smp 2, this machine has 1"):
        dst.devices()[0].load(Reader(src.devices()[0].save()), 1)
    big = make(memory=16 * MiB)
    with pytest.raises(ValueError, match="memory 16777216"):
        src.devices()[0].load(Reader(big.devices()[0].save()), 1)
    with pytest.raises(ValueError, match="unsupported version 2"):
        src.devices()[0].load(Reader(src.devices()[0].save()), 2)
    with pytest.raises(EOFError):
        src.devices()[0].load(Reader(b"\0" * 5), 1)
    for m in (src, dst, big):
        m.shutdown()


def test_vcpu_state_with_bad_lengths_or_specs_is_refused():
    m = make(smp=1)
    dev = m.devices()[1]
    good = bytearray(dev.save())
    bad_len = good[:4] + struct.pack(">I", 500) + good[8:]
    with pytest.raises(ValueError, match="spec length 500 exceeds 128"):
        dev.load(Reader(bytes(bad_len)), 1)
    spec = b"busy"
    bad_spec = good[:4] + struct.pack(">I", len(spec)) + spec.ljust(128, b"\0") + good[8 + 128:]
    with pytest.raises(ValueError, match="unknown kind 'busy'"):
        dev.load(Reader(bytes(bad_spec)), 1)
    wrong_index = struct.pack(">I", 7) + good[4:]
    with pytest.raises(ValueError, match="state of vcpu 7"):
        dev.load(Reader(bytes(wrong_index)), 1)
    assert m.workload.spec.kind == "idle"
    r = Reader(bytes(good) + b"tail")
    dev.load(r, 1)
    assert r.left() == 4  # read exactly its own fields
    m.shutdown()


def test_drive_state_checks_image_size(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(MiB))
    b.write_bytes(bytes(2 * MiB))
    src = make(drives=[str(a)])
    src.drives[0].write(0, b"x" * 4096)
    dst = make(drives=[str(b)])
    with pytest.raises(ValueError, match="source image has 1048576 bytes"):
        dst.devices()[3].load(Reader(src.devices()[3].save()), 1)
    src.shutdown()
    dst.shutdown()


def transfer(src: Machine, dst: Machine) -> None:
    """What a migration does once the source is stopped: RAM, then the device sections."""
    for block in src.ram.blocks():
        dst.ram.get(block.name).buf[:] = block.buf
    for s, d in zip(src.devices(), dst.devices(), strict=True):
        assert (s.idstr, s.instance_id) == (d.idstr, d.instance_id)
        d.load(Reader(s.save()), s.version_id)


def test_counter_guest_continues_exactly_on_another_machine():
    src = make("counter,rate=2M")
    src.start()
    wait_for(lambda: all(getattr(v.wstate, "counter", 0) > 50 for v in src.vcpus))
    src.vm_stop(RunState.FINISH_MIGRATE)
    stopped_at = [v.wstate.counter for v in src.vcpus]
    dst = make("idle", initial=RunState.INMIGRATE)
    dst.start()
    transfer(src, dst)
    info = dst.workload_info()
    assert info["spec"] == str(src.workload.spec)  # the destination adopted the guest's workload
    assert [v["counter"] for v in info["vcpus"]] == stopped_at
    assert all(v["consistent"] for v in info["vcpus"])
    dst.vm_start()
    wait_for(lambda: all(v.wstate.counter > c + 20 for v, c in zip(dst.vcpus, stopped_at, strict=True)))
    assert all(v.error is None for v in dst.vcpus)
    # the pause between the source's last slice and the destination's first is the guest-felt stall
    assert dst.workload_info()["largest-stall-ms"] > 0
    src.shutdown()
    dst.shutdown()


def test_a_lost_page_stops_the_migrated_counter_guest():
    src = make("counter,rate=2M", smp=1)
    src.start()
    wait_for(lambda: getattr(src.vcpus[0].wstate, "counter", 0) > 70)
    src.vm_stop(RunState.FINISH_MIGRATE)
    dst = make("idle", smp=1, initial=RunState.INMIGRATE)
    dst.start()
    transfer(src, dst)
    dst.ram.get("ram0").pages[0] = 0  # the header page never arrived
    assert dst.workload_info()["vcpus"][0]["consistent"] is False
    dst.vm_start()
    wait_for(lambda: dst.vcpus[0].error is not None)
    assert "RAM holds counter 0" in dst.vcpus[0].error
    src.shutdown()
    dst.shutdown()


def test_random_guest_position_is_carried():
    src = make("random,rate=16M,seed=4", smp=1)
    src.start()
    wait_for(lambda: getattr(src.vcpus[0].wstate, "seq", 0) > 5)
    src.vm_stop(RunState.FINISH_MIGRATE)
    seq = src.vcpus[0].wstate.seq
    written = src.vcpus[0].stats.bytes_written
    dst = make("idle", smp=1, initial=RunState.INMIGRATE)
    dst.start()
    transfer(src, dst)
    assert np.array_equal(dst.ram.get("ram0").buf, src.ram.get("ram0").buf)
    assert dst.vcpus[0].wstate.seq == seq and dst.vcpus[0].stats.bytes_written == written
    dst.vm_start()
    wait_for(lambda: dst.vcpus[0].wstate.seq > seq)
    assert dst.workload.spec.seed == 4
    src.shutdown()
    dst.shutdown()


def test_vcpu_device_describe_is_stable():
    m = make(smp=1)
    desc = VCPUDevice(m, 0).describe()
    assert [f["name"] for f in desc["fields"]][:3] == ["index", "spec_len", "spec"]
    assert desc["fields"][2] == {"name": "spec", "type": "buffer", "size": 128}
    m.shutdown()


def test_incoming_guest_left_paused_feels_only_the_migration_as_stall():
    src = make("counter,rate=1M", smp=1)
    src.start()
    wait_for(lambda: getattr(src.vcpus[0].wstate, "counter", 0) > 5)
    src.vm_stop(RunState.FINISH_MIGRATE)
    dst = make("idle", smp=1, initial=RunState.INMIGRATE)
    dst.start()
    transfer(src, dst)
    dst.runstate.set(RunState.PAUSED)  # -S: loaded, not started; the stall ends here
    stall = dst.vcpus[0].stats.largest_stall
    assert stall > 0
    time.sleep(0.3)  # the user waits before cont: not a stall
    dst.vm_start()
    wait_for(lambda: dst.vcpus[0].stats.slices > 3)
    assert dst.vcpus[0].stats.largest_stall < stall + 0.3
    src.shutdown()
    dst.shutdown()


def test_global_state_carries_the_run_state_before_the_migration_stopped_the_guest():
    src, dst = make(), make(initial=RunState.INMIGRATE)
    src.runstate.set(RunState.PAUSED)
    src.runstate.set(RunState.FINISH_MIGRATE)  # what the migration's vm_stop does
    dst.devices()[-1].load(Reader(src.devices()[-1].save()), 1)
    assert dst.incoming_runstate is RunState.PAUSED
    bogus = struct.pack(">I", 6) + b"dancing".ljust(100, b"\0")
    with pytest.raises(ValueError, match="unknown run state"):
        dst.devices()[-1].load(Reader(bogus), 1)
    with pytest.raises(ValueError, match="run state name of 0 bytes"):
        dst.devices()[-1].load(Reader(bytes(104)), 1)
    assert dst.incoming_runstate is RunState.PAUSED  # a refused state changed nothing
    for m in (src, dst):
        m.shutdown()
