"""The machine: RAM, vCPUs, drives and device state, started and stopped like QEMU's vm_start/vm_stop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from migd.machine.ram import RAMList
from migd.machine.runstate import LIVE_STATES, RunState, RunStateMachine
from migd.machine.vcpu import VCPU, VCPUSet

if TYPE_CHECKING:
    from migd.config import MachineConfig
    from migd.events import EventSink

# Stops the guest should feel as a stall (see vcpu.py); a user's stop/prelaunch/shutdown is not one.
_UNCOUNTED_STOPS = frozenset({RunState.PAUSED, RunState.PRELAUNCH, RunState.SHUTDOWN})


class Machine:
    """One guest. Callers of vm_stop/vm_start and of the drive methods hold the BQL."""

    def __init__(self, config: MachineConfig, runstate: RunStateMachine, events: EventSink) -> None:
        self.config = config
        self.runstate = runstate
        self.events = events
        self.ram = RAMList()
        self.ram.add(RAMList.MAIN, int(config.memory), mem_path=getattr(config, "mem_path", None))
        self.vcpus = VCPUSet(int(config.smp), self._run_slice)
        self.drives: list[Any] = []
        self._started = False
        self._closed = False
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
        self.ram.close()

    # -- run state -----------------------------------------------------------------------------

    def vm_stop(self, state: RunState = RunState.PAUSED) -> bool:
        """QEMU's vm_stop: if live, set ``state``, pause every vCPU (acknowledged), emit STOP."""
        if not self.runstate.is_live():
            return False
        self.runstate.set(state)  # the notifier pauses the vCPUs before this returns
        self.vcpus.pause_all(count_stall=state not in _UNCOUNTED_STOPS)
        self.events.emit("STOP")
        return True

    def vm_stop_force_state(self, state: RunState) -> None:
        """QEMU's vm_stop_force_state: stop if live, otherwise just move to ``state``."""
        if not self.vm_stop(state):
            self.runstate.set(state)

    def vm_start(self) -> None:
        """Run state running, vCPUs resumed, RESUME emitted (QEMU emits it even when already running)."""
        self.runstate.set(RunState.RUNNING)
        self.vcpus.resume_all()
        self.events.emit("RESUME")

    def _on_runstate(self, old: RunState, new: RunState) -> None:
        """Keep the vCPUs in step with the run state, whoever changes it."""
        if not self._started or self._closed:
            return
        if new in LIVE_STATES:
            self.vcpus.resume_all()
        elif old in LIVE_STATES:
            self.vcpus.pause_all(count_stall=new not in _UNCOUNTED_STOPS)

    # -- vCPU work -----------------------------------------------------------------------------

    def _run_slice(self, vcpu: VCPU) -> None:
        return None

    # -- drives and devices --------------------------------------------------------------------

    def flush_drives(self) -> None:
        for d in self.drives:
            d.flush()

    def drain_drives(self) -> None:
        for d in self.drives:
            d.drain()

    def inactivate_drives(self) -> None:
        for d in self.drives:
            d.inactivate()

    def activate_drives(self) -> None:
        for d in self.drives:
            d.activate()

    def devices(self) -> list[Any]:
        """The non-iterative device sections, in save order."""
        return []
