"""vCPU threads: acknowledged pause, resume, throttle, stall probe, exit; Machine.vm_stop/vm_start."""

from __future__ import annotations

import threading
import time

import pytest

from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.machine.vcpu import VCPU, VCPUSet


def wait_for(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


class Recorder:
    """A slice runner that records which vCPU ran and can be told to block mid-slice."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[int, int] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()  # a vCPU is inside its slice, held at the closed gate

    def __call__(self, vcpu: VCPU) -> None:
        if not self.gate.is_set():
            self.blocked.set()
        self.gate.wait(10)
        with self.lock:
            self.calls[vcpu.index] = self.calls.get(vcpu.index, 0) + 1

    def total(self) -> int:
        with self.lock:
            return sum(self.calls.values())


@pytest.fixture
def vset():
    rec = Recorder()
    vs = VCPUSet(3, rec)
    vs.rec = rec  # type: ignore[attr-defined]
    vs.start()
    yield vs
    rec.gate.set()
    vs.shutdown()


def test_vcpus_start_paused_and_run_after_resume(vset):
    assert vset.pause_all(timeout=10)
    assert vset.rec.total() == 0
    vset.resume_all()
    wait_for(lambda: len(vset.rec.calls) == 3 and min(vset.rec.calls.values()) >= 3)


def test_pause_all_waits_for_a_vcpu_in_the_middle_of_a_slice(vset):
    vset.resume_all()
    wait_for(lambda: vset.rec.total() > 0)
    vset.rec.gate.clear()  # a vCPU entering its slice now blocks there
    assert vset.rec.blocked.wait(10)
    done = threading.Event()
    threading.Thread(target=lambda: (vset.pause_all(), done.set()), daemon=True).start()
    assert not done.wait(0.2)  # cannot return while a vCPU is inside its slice
    vset.rec.gate.set()
    assert done.wait(10)
    assert vset.all_paused()
    frozen = vset.rec.total()
    time.sleep(0.05)
    assert vset.rec.total() == frozen  # nothing runs after the acknowledgement


def test_pause_timeout_reports_false(vset):
    vset.resume_all()
    wait_for(lambda: vset.rec.total() > 0)
    vset.rec.gate.clear()
    assert vset.rec.blocked.wait(10)
    assert vset.pause_all(timeout=0.05) is False
    vset.rec.gate.set()
    assert vset.pause_all(timeout=10)


def test_pause_from_a_vcpu_thread_is_refused():
    errors: list[Exception] = []

    def runner(vcpu: VCPU) -> None:
        try:
            vcpu.vset.pause_all()
        except RuntimeError as exc:
            errors.append(exc)

    vs = VCPUSet(1, runner)
    vs.start()
    vs.resume_all()
    wait_for(lambda: errors)
    vs.shutdown()
    assert "vCPU thread" in str(errors[0])


def test_throttle_slows_slices_and_counts_as_stall():
    vs = VCPUSet(1)
    vs.start()
    vs.resume_all()
    wait_for(lambda: vs[0].stats.slices >= 5)
    with pytest.raises(ValueError):
        vs.throttle(100)
    vs.throttle(80)  # 40 ms of sleep after each 10 ms slice
    assert vs.throttle_percentage == 80
    wait_for(lambda: vs[0].stats.largest_stall >= 0.045)
    # run time excludes the throttle sleep
    n0, r0, t0 = vs[0].stats.slices, vs[0].stats.run_time, time.monotonic()
    wait_for(lambda: vs[0].stats.slices >= n0 + 5)
    assert vs[0].stats.run_time - r0 < (time.monotonic() - t0) * 0.6
    vs.throttle(0)
    vs.shutdown()
    assert not vs[0].thread.is_alive()


def test_shutdown_ends_threads_even_when_paused(vset):
    vset.pause_all()
    vset.shutdown()
    assert all(not v.thread.is_alive() for v in vset)


def make_machine(**kw) -> tuple[Machine, RunStateMachine, list[str]]:
    rs = RunStateMachine(kw.pop("initial", RunState.RUNNING))
    ev = EventSink()
    names: list[str] = []
    ev.subscribe(lambda e: names.append(e["event"]))
    cfg = MachineConfig(memory=kw.pop("memory", 4 << 20), smp=kw.pop("smp", 2), **kw)
    m = Machine(cfg, rs, ev)
    return m, rs, names


def test_vm_stop_and_start_follow_qemu():
    m, rs, events = make_machine()
    m.start()
    wait_for(lambda: all(v.stats.slices > 2 for v in m.vcpus))
    assert m.vm_stop() is True
    assert rs.state is RunState.PAUSED and m.vcpus.all_paused() and events == ["STOP"]
    assert m.vm_stop() is False and events == ["STOP"]  # not live: nothing happens
    m.vm_start()
    assert rs.state is RunState.RUNNING and events == ["STOP", "RESUME"]
    n = m.vcpus[0].stats.slices
    wait_for(lambda: m.vcpus[0].stats.slices > n)
    m.vm_stop_force_state(RunState.FINISH_MIGRATE)
    assert rs.state is RunState.FINISH_MIGRATE and m.vcpus.all_paused()
    m.shutdown()
    m.shutdown()


def test_run_state_changes_by_others_move_the_vcpus():
    m, rs, _ = make_machine(initial=RunState.INMIGRATE)
    m.start()
    time.sleep(0.05)
    assert all(v.stats.slices == 0 for v in m.vcpus)  # inmigrate: vCPUs do not run
    rs.set(RunState.RUNNING)
    wait_for(lambda: all(v.stats.slices > 0 for v in m.vcpus))
    rs.set(RunState.PAUSED)
    assert m.vcpus.all_paused()
    m.shutdown()


def test_user_stop_is_not_a_stall_but_a_migration_stop_is():
    m, rs, _ = make_machine(smp=1)
    m.start()
    wait_for(lambda: m.vcpus[0].stats.slices > 3)
    m.vm_stop()
    time.sleep(0.5)
    m.vm_start()
    wait_for(lambda: m.vcpus[0].stats.slices > 8)
    assert m.vcpus[0].stats.largest_stall < 0.5  # the user's pause is forgotten
    m.vm_stop(RunState.FINISH_MIGRATE)
    time.sleep(0.2)
    rs.set(RunState.RUNNING)  # a failed migration resumes the guest
    n = m.vcpus[0].stats.slices
    wait_for(lambda: m.vcpus[0].stats.slices > n)
    assert m.vcpus[0].stats.largest_stall >= 0.2  # felt by the guest
    m.shutdown()
