"""Machine commands: RAM hot-plug, the workload, and introspection (all ``x-migd-`` extensions).

``query-status``/``stop``/``cont`` live with the daemon's commands; they go through
``Machine.vm_stop``/``vm_start``, which is what makes ``stop`` freeze RAM.
"""

from __future__ import annotations

from typing import Any

from migd.bql import BQL
from migd.machine.workloads import WorkloadError
from migd.qmp.commands import CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs, UInt64

MAX_HOTPLUG = 1 << 40  # a sanity bound on one hot-plugged block


class RamAddArgs(QMPArgs):
    name: str
    size: UInt64


class RamRemoveArgs(QMPArgs):
    name: str


class WorkloadSetArgs(QMPArgs):
    spec: str


def _machine(ctx: CommandContext) -> Any:
    machine = getattr(ctx.daemon, "machine", None)
    if machine is None:
        raise QMPError("No machine is running")
    return machine


@command("x-migd-ram-add", RamAddArgs)
def ram_add(ctx: CommandContext, args: RamAddArgs) -> dict[str, Any]:
    """Hot-plug a RAM block; allowed while running and while migrating (RAMList.version tells)."""
    machine = _machine(ctx)
    if args.size > MAX_HOTPLUG:
        raise QMPError(f"Parameter 'size' expects a size of at most {MAX_HOTPLUG} bytes")
    with BQL:
        try:
            machine.ram.add(args.name, args.size)
        except ValueError as exc:
            raise QMPError(str(exc)) from exc
        except OSError as exc:
            raise QMPError(f"cannot set up guest memory '{args.name}': {exc.strerror}") from exc
    return {}


@command("x-migd-ram-remove", RamRemoveArgs)
def ram_remove(ctx: CommandContext, args: RamRemoveArgs) -> dict[str, Any]:
    machine = _machine(ctx)
    with BQL:
        try:
            machine.ram.remove(args.name)
        except KeyError as exc:
            raise QMPError(f"RAM block '{args.name}' not found", "DeviceNotFound") from exc
        except ValueError as exc:
            raise QMPError(str(exc)) from exc
    return {}


@command("x-migd-workload-set", WorkloadSetArgs)
def workload_set(ctx: CommandContext, args: WorkloadSetArgs) -> dict[str, Any]:
    machine = _machine(ctx)
    with BQL:
        try:
            machine.set_workload(args.spec)
        except WorkloadError as exc:
            raise QMPError(str(exc)) from exc
    return {}


@command("x-migd-query-workload")
def query_workload(ctx: CommandContext, args: None) -> dict[str, Any]:
    with BQL:
        return _machine(ctx).workload_info()


@command("x-migd-query-machine")
def query_machine(ctx: CommandContext, args: None) -> dict[str, Any]:
    with BQL:
        return _machine(ctx).machine_info()


@command("x-migd-ram-digest")
async def ram_digest(ctx: CommandContext, args: None) -> dict[str, Any]:
    """Per-block xxh3-128 of the contents, hashed on a worker thread so QMP stays responsive."""
    machine = _machine(ctx)
    run_blocking = getattr(ctx.daemon, "run_blocking", None)
    if run_blocking is None:
        return {"blocks": machine.ram_digest()}
    return {"blocks": await run_blocking(machine.ram_digest)}
