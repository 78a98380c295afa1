"""The machine: RAM, vCPUs, workload, drives and device state, driven like QEMU's vm_start/vm_stop."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import xxhash

from migd.machine.block import Drive
from migd.machine.ram import RAMList
from migd.machine.runstate import LIVE_STATES, RunState, RunStateMachine
from migd.machine.vcpu import VCPU, VCPUSet
from migd.machine.vmstate import (
    DriveDevice,
    GlobalStateDevice,
    MachineDevice,
    Value,
    VCPUDevice,
    VMStateDevice,
)
from migd.machine.workloads import (
    CounterCorrupt,
    VCPUWork,
    Workload,
    WorkloadError,
    WorkloadSpec,
    check_counter,
    parse_workload,
    read_counter,
)

if TYPE_CHECKING:
    from migd.config import MachineConfig
    from migd.events import EventSink

# Stops the guest should feel as a stall (see vcpu.py); a user's stop/prelaunch/shutdown is not one.
_UNCOUNTED_STOPS = frozenset({RunState.PAUSED, RunState.PRELAUNCH, RunState.SHUTDOWN})


class Machine:
    """One guest. Callers of vm_stop/vm_start and of the drive methods hold the BQL.

    A machine constructed while the run state is ``inmigrate`` is a migration destination: its drives
    open inactive (the source holds the image locks) and are activated when the migration completes.
    """

    def __init__(self, config: MachineConfig, runstate: RunStateMachine, events: EventSink) -> None:
        self.config = config
        self.name = str(getattr(config, "name", "") or "migd")
        self.runstate = runstate
        self.events = events
        self.ram = RAMList()
        self.ram.add(RAMList.MAIN, int(config.memory), mem_path=getattr(config, "mem_path", None),
                     share=bool(getattr(config, "mem_share", False)))
        self.vcpus = VCPUSet(int(config.smp), self._run_slice)
        incoming = runstate.state is RunState.INMIGRATE
        self.drives: list[Drive] = []
        try:
            for dc in getattr(config, "drives", None) or []:
                self.drives.append(Drive(str(dc.file), getattr(dc, "cache", None) or "writeback",
                                         active=not incoming))
            self.workload = self._build(parse_workload(getattr(config, "workload", None) or "idle"))
        except Exception:
            self._close_drives()
            self.ram.close()
            raise
        self._started = False
        self._closed = False
        self._stop_abort: Callable[[], bool] | None = None  # while vm_stop waits for the vCPUs
        # QEMU's global state: the run state the guest had when a migration stopped it (sent to the
        # destination, which resumes the guest only if it was live), and the one a stream brought in.
        self.state_before_migration: RunState | None = None
        self.incoming_runstate: RunState | None = None
        runstate.add_notifier(self._on_runstate)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the vCPU threads; they run iff the run state is live."""
        if self._started:
            return
        self._started = True
        self.vcpus.start()
        if self.runstate.is_live():
            self.vcpus.resume_all()

    def shutdown(self) -> None:
        """Stop the vCPUs for good, flush and unlock drives, unmap RAM. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.runstate.remove_notifier(self._on_runstate)
        except ValueError:
            pass
        self.vcpus.shutdown()
        self._close_drives()
        self.ram.close()

    def _close_drives(self) -> None:
        for d in self.drives:
            d.close()

    # -- run state -----------------------------------------------------------------------------

    def vm_stop(self, state: RunState = RunState.PAUSED, *, abort: Callable[[], bool] | None = None) -> bool:
        """QEMU's vm_stop: if live, set ``state``, pause every vCPU (acknowledged), emit STOP.

        ``abort`` ends the wait for the acknowledgements early once it turns true (checked when
        ``vcpus.wake_pausers()`` is called): the run state has changed either way, and the caller
        that aborted resumes the guest.
        """
        if not self.runstate.is_live():
            return False
        self._stop_abort = abort
        try:
            self.runstate.set(state)  # the notifier pauses the vCPUs before this returns
            self.vcpus.pause_all(count_stall=state not in _UNCOUNTED_STOPS, abort=abort)
        finally:
            self._stop_abort = None
        self.events.emit("STOP")
        return True

    def vm_stop_force_state(self, state: RunState, *, abort: Callable[[], bool] | None = None) -> None:
        """QEMU's vm_stop_force_state: stop if live, otherwise just move to ``state``."""
        if not self.vm_stop(state, abort=abort):
            self.runstate.set(state)

    def vm_start(self) -> None:
        """Run state running, vCPUs resumed, RESUME emitted (nothing if it already runs, like QEMU)."""
        if self.runstate.state is RunState.RUNNING:
            return
        self.runstate.set(RunState.RUNNING)
        self.vcpus.resume_all()
        self.events.emit("RESUME")

    def _on_runstate(self, old: RunState, new: RunState) -> None:
        """Keep the vCPUs in step with the run state, whoever changes it."""
        if self._closed:
            return
        if new is RunState.FINISH_MIGRATE:
            self.state_before_migration = old
        if old is RunState.INMIGRATE and new not in LIVE_STATES:
            for v in self.vcpus:
                v.settle_wall_ref()
        if not self._started:
            return
        if new in LIVE_STATES:
            self.vcpus.resume_all()
        elif old in LIVE_STATES:
            self.vcpus.pause_all(count_stall=new not in _UNCOUNTED_STOPS, abort=self._stop_abort)

    # -- workload ------------------------------------------------------------------------------

    def _build(self, spec: WorkloadSpec) -> Workload:
        ram0 = self.ram.get(RAMList.MAIN)
        assert ram0 is not None
        return Workload(spec, ram0, self.drives, len(self.vcpus))

    def set_workload(self, text: str) -> Workload:
        """Parse and switch the workload at run time (WorkloadError leaves the old one running)."""
        wl = self._build(parse_workload(text))
        self.workload = wl  # each vCPU attaches at its next slice, with fresh state and stats
        return wl

    def _run_slice(self, vcpu: VCPU) -> None:
        wl = self.workload
        w = vcpu.wstate
        if not isinstance(w, VCPUWork) or w.owner is not wl:
            pending = w if isinstance(w, VCPUWork) and w.owner == "incoming" else None
            if pending is None:
                vcpu.reset_stats()
            wl.attach(vcpu, pending)
        wl.run(vcpu)

    def vcpu_state(self, index: int) -> dict[str, Value]:
        """The vCPU's device state (VCPUDevice), read while the vCPUs are stopped."""
        vcpu = self.vcpus[index]
        w = vcpu.wstate if isinstance(vcpu.wstate, VCPUWork) else VCPUWork()
        spec = str(self.workload.spec).encode()
        return {"index": index, "spec_len": len(spec), "spec": spec, "seq": w.seq, "counter": w.counter,
                "bytes_written": vcpu.stats.bytes_written,
                "disk_bytes_written": vcpu.stats.disk_bytes_written,
                "largest_stall_us": int(vcpu.stats.largest_stall * 1e6),
                "last_slice_wall_ns": int(vcpu.last_slice_wall() * 1e9)}

    def load_vcpu_state(self, index: int, spec: str, values: dict[str, Value]) -> None:
        """Incoming: adopt the source's workload and this vCPU's position in it (vCPUs not running)."""
        if not self.vcpus.all_paused():
            raise ValueError("vcpu state can only be loaded while the vCPUs are stopped")
        try:
            parsed = parse_workload(spec)
        except WorkloadError as exc:
            raise ValueError(f"vcpu {index}: {exc}") from exc
        if str(parsed) != str(self.workload.spec):
            try:
                self.workload = self._build(parsed)
            except WorkloadError as exc:
                raise ValueError(f"vcpu {index}: {exc}") from exc
        vcpu = self.vcpus[index]
        vcpu.reset_stats()
        vcpu.stats.bytes_written = int(values["bytes_written"])
        vcpu.stats.disk_bytes_written = int(values["disk_bytes_written"])
        vcpu.stats.largest_stall = int(values["largest_stall_us"]) / 1e6
        vcpu.set_wall_ref(int(values["last_slice_wall_ns"]) / 1e9)
        vcpu.wstate = VCPUWork(seq=int(values["seq"]), counter=int(values["counter"]), owner="incoming")

    # -- drives and devices --------------------------------------------------------------------

    def flush_drives(self) -> None:
        for d in self.drives:
            d.flush()

    def drain_drives(self) -> None:
        for d in self.drives:
            d.drain()

    def inactivate_drives(self) -> None:
        """Switch-over: flush and unlock the drive images, and unlock the mem-path file."""
        for d in self.drives:
            d.inactivate()
        self.ram.unlock_files()

    def activate_drives(self) -> None:
        """Take the mem-path and drive locks back (a failed migration's source, or a destination)."""
        self.ram.lock_files()
        for d in self.drives:
            d.activate()

    def devices(self) -> list[VMStateDevice]:
        """The non-iterative device sections, in save order: machine shape, vCPUs, drives, run state."""
        devs: list[VMStateDevice] = [MachineDevice(self)]
        devs += [VCPUDevice(self, i) for i in range(len(self.vcpus))]
        devs += [DriveDevice(self, i) for i in range(len(self.drives))]
        devs.append(GlobalStateDevice(self))
        return devs

    # -- introspection (QMP) -------------------------------------------------------------------

    def ram_digest(self) -> list[dict[str, Any]]:
        """xxh3-128 of every block's contents. Slow for big RAM: call it off the event loop."""
        out = []
        for block in self.ram.blocks():
            buf = block.buf
            out.append({"name": block.name, "size": block.size,
                        "digest": xxhash.xxh3_128_hexdigest(buf.data)})
        return out

    def workload_info(self) -> dict[str, Any]:
        wl = self.workload
        spec = wl.spec
        vcpus = []
        ram_rate = disk_rate = 0.0
        stall = 0.0
        ram0 = self.ram.get(RAMList.MAIN)
        for v in self.vcpus:
            r, d = v.stats.achieved()
            ram_rate += r
            disk_rate += d
            stall = max(stall, v.stats.largest_stall)
            w = v.wstate if isinstance(v.wstate, VCPUWork) else None
            info: dict[str, Any] = {
                "index": v.index, "achieved-rate": int(r), "achieved-disk-rate": int(d),
                "bytes-written": v.stats.bytes_written, "disk-bytes-written": v.stats.disk_bytes_written,
                "largest-stall-ms": round(v.stats.largest_stall * 1000, 3), "slices": v.stats.slices,
                "seq": w.seq if w else 0}
            if spec.kind == "counter" and ram0 is not None:
                info["counter"] = w.counter if w else 0
                info["ram-counter"] = read_counter(ram0, v.index)[1]
                if not self.vcpus.running:  # a consistent read needs the guest stopped
                    try:
                        check_counter(ram0, v.index, expect=w.counter if w else None)
                        info["consistent"] = True
                    except CounterCorrupt as exc:
                        info["consistent"] = False
                        info["error"] = str(exc)
            if v.error:
                info["error"] = v.error
            vcpus.append(info)
        return {"spec": str(spec), "kind": spec.kind, "rate": spec.rate, "achieved-rate": int(ram_rate),
                "disk-rate": spec.disk_rate, "achieved-disk-rate": int(disk_rate),
                "wss": spec.wss if spec.wss is not None else (ram0.size if ram0 else 0),
                "seed": spec.seed, "largest-stall-ms": round(stall * 1000, 3),
                "throttle-percentage": self.vcpus.throttle_percentage, "vcpus": vcpus,
                "time": time.time()}

    def machine_info(self) -> dict[str, Any]:
        blocks = [{"name": b.name, "size": b.size, "page-size": b.page_size,
                   **({"mem-path": b.mem_path, "share": b.share, "locked": b.locked} if b.mem_path else {})}
                  for b in self.ram.blocks()]
        wl = self.workload_info()
        return {"name": self.name, "status": str(self.runstate.state),
                "ram": {"version": self.ram.version, "total": self.ram.total_bytes(), "blocks": blocks,
                        "dirty-logging": self.ram.logging},
                "smp": len(self.vcpus),
                "vcpus": [{"index": v.index, "thread-alive": v.thread.is_alive(), "paused": v.paused,
                           "largest-stall-ms": round(v.stats.largest_stall * 1000, 3)} for v in self.vcpus],
                "throttle-percentage": self.vcpus.throttle_percentage,
                "workload": {k: wl[k] for k in ("spec", "rate", "achieved-rate", "disk-rate",
                                                "achieved-disk-rate", "largest-stall-ms")},
                "drives": [d.info() for d in self.drives]}
