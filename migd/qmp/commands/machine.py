"""Machine commands: RAM hot-plug, the workload, and introspection (all ``x-migd-`` extensions).

``query-status``/``stop``/``cont`` live with the daemon's commands; they go through
``Machine.vm_stop``/``vm_start``, which is what makes ``stop`` freeze RAM. On a daemon holding a
foreign (QEMU) machine, ``x-migd-query-machine`` and ``x-migd-ram-digest`` describe that machine.
"""

from __future__ import annotations

from typing import Any

import xxhash

from migd.machine.workloads import WorkloadError
from migd.qmp.commands.foreign import foreign_machine_info, held_machine
from migd.qmp.registry import CommandContext, QMPError, command, under_bql
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


def _ram_add(machine: Any, name: str, size: int) -> dict[str, Any]:
    try:
        machine.ram.add(name, size)
    except ValueError as exc:
        raise QMPError(str(exc)) from exc
    except OSError as exc:
        raise QMPError(f"cannot set up guest memory '{name}': {exc.strerror}") from exc
    return {}


@command("x-migd-ram-add", RamAddArgs)
async def ram_add(ctx: CommandContext, args: RamAddArgs) -> dict[str, Any]:
    """Hot-plug a RAM block; allowed while running and while migrating (RAMList.version tells)."""
    machine = _machine(ctx)
    if args.size > MAX_HOTPLUG:
        raise QMPError(f"Parameter 'size' expects a size of at most {MAX_HOTPLUG} bytes")
    return await under_bql(ctx, _ram_add, machine, args.name, args.size)


def _ram_remove(machine: Any, name: str) -> dict[str, Any]:
    try:
        machine.ram.remove(name)
    except KeyError as exc:
        raise QMPError(f"RAM block '{name}' not found", "DeviceNotFound") from exc
    except ValueError as exc:
        raise QMPError(str(exc)) from exc
    return {}


@command("x-migd-ram-remove", RamRemoveArgs)
async def ram_remove(ctx: CommandContext, args: RamRemoveArgs) -> dict[str, Any]:
    return await under_bql(ctx, _ram_remove, _machine(ctx), args.name)


def _workload_set(machine: Any, spec: str) -> dict[str, Any]:
    try:
        machine.set_workload(spec)
    except WorkloadError as exc:
        raise QMPError(str(exc)) from exc
    return {}


@command("x-migd-workload-set", WorkloadSetArgs)
async def workload_set(ctx: CommandContext, args: WorkloadSetArgs) -> dict[str, Any]:
    return await under_bql(ctx, _workload_set, _machine(ctx), args.spec)


@command("x-migd-query-workload")
async def query_workload(ctx: CommandContext, args: None) -> dict[str, Any]:
    return await under_bql(ctx, _machine(ctx).workload_info)


@command("x-migd-query-machine")
async def query_machine(ctx: CommandContext, args: None) -> dict[str, Any]:
    held = held_machine(ctx)
    if held is not None:
        return foreign_machine_info(ctx, held)
    return await under_bql(ctx, _machine(ctx).machine_info)


def _digest(blocks: list[Any]) -> list[dict[str, Any]]:
    """(worker thread) xxh3-128 of every block's contents."""
    return [{"name": b.name, "size": b.size, "digest": xxhash.xxh3_128_hexdigest(b.buf.data)} for b in blocks]


@command("x-migd-ram-digest")
async def ram_digest(ctx: CommandContext, args: None) -> dict[str, Any]:
    """Per-block xxh3-128 of the contents (of the held foreign machine's blocks when there is one),
    hashed on a worker thread so QMP stays responsive."""
    held = held_machine(ctx)
    if held is not None:
        return {"blocks": await ctx.daemon.run_blocking(_digest, held.ram.blocks())}
    return {"blocks": await ctx.daemon.run_blocking(_machine(ctx).ram_digest)}
