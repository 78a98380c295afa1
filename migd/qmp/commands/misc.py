"""The general QMP commands: capabilities, identity, run state (stop/cont), quit and fd passing."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

from migd import QEMU_COMPAT_VERSION, __version__
from migd.machine.runstate import RunState
from migd.qmp.registry import REGISTRY, CommandContext, CommandHost, QMPError, command, under_bql
from migd.qmp.schema import QMPArgs

# Run states from which only a reset helps (QEMU's runstate_needs_reset); migd has no reset.
_NEEDS_RESET = frozenset({RunState.INTERNAL_ERROR, RunState.SHUTDOWN, RunState.GUEST_PANICKED})


class CapabilitiesArgs(QMPArgs):
    enable: list[Literal["oob"]] | None = None


@command("qmp_capabilities", CapabilitiesArgs)
def qmp_capabilities(ctx: CommandContext, args: CapabilitiesArgs) -> None:
    """Negotiation itself is done by the server; once in command mode this is a no-op error."""
    raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")


@command("query-version")
def query_version(ctx: CommandContext, args: None) -> dict[str, Any]:
    major, minor, micro = QEMU_COMPAT_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"migd {__version__}"}


@command("query-commands")
def query_commands(ctx: CommandContext, args: None) -> list[dict[str, Any]]:
    return [{"name": name} for name in sorted(REGISTRY)]


@command("query-name")
def query_name(ctx: CommandContext, args: None) -> dict[str, Any]:
    name = ctx.daemon.config.machine.name
    return {"name": name} if name is not None else {}


@command("query-status")
def query_status(ctx: CommandContext, args: None) -> dict[str, Any]:
    state = ctx.daemon.runstate.state
    return {"running": state is RunState.RUNNING, "singlestep": False, "status": str(state)}


@command("stop")
async def stop(ctx: CommandContext, args: None) -> dict[str, Any]:
    """QEMU's qmp_stop: while an incoming migration is awaited, only cancel the automatic start.

    Runs on a worker thread: waiting for the big lock (held through a migration's switch-over) or
    for every vCPU to acknowledge must not freeze the event loop and the other QMP clients.
    """
    return await under_bql(ctx, _stop, ctx.daemon)


def _stop(daemon: CommandHost) -> dict[str, Any]:
    if daemon.runstate.state is RunState.INMIGRATE:
        daemon.autostart = False
    else:
        daemon.machine.vm_stop(RunState.PAUSED)
    return {}


@command("cont")
async def cont(ctx: CommandContext, args: None) -> dict[str, Any]:
    """QEMU's qmp_cont: resume the guest; during inmigrate, start it once the migration lands."""
    return await under_bql(ctx, _cont, ctx.daemon)


def _cont(daemon: CommandHost) -> dict[str, Any]:
    state = daemon.runstate.state
    if state in _NEEDS_RESET:
        raise QMPError("Resetting the Virtual Machine is required")
    if state in (RunState.SUSPENDED, RunState.RUNNING):
        return {}  # QEMU's vm_prepare_start: already running, nothing to do and no RESUME
    if state is RunState.FINISH_MIGRATE:
        raise QMPError("Migration is not finalized yet")
    if state is RunState.INMIGRATE:
        daemon.autostart = True
        return {}
    if state is RunState.POSTMIGRATE:
        daemon.machine.activate_drives()  # the destination may have them; take them back
    daemon.machine.vm_start()
    return {}


@command("quit")
def quit_(ctx: CommandContext, args: None) -> dict[str, Any]:
    """Reply first, then SHUTDOWN and exit 0 (the daemon does both from the loop)."""
    ctx.daemon.request_shutdown("host-qmp-quit")
    return {}


class GetfdArgs(QMPArgs):
    fdname: str


@command("getfd", GetfdArgs)
def getfd(ctx: CommandContext, args: GetfdArgs) -> dict[str, Any]:
    """Name the fd that came with this command over SCM_RIGHTS (unix sockets only)."""
    session = ctx.session
    fd = session.take_received_fd()
    if fd is None:
        raise QMPError("No file descriptor supplied via SCM_RIGHTS")
    if args.fdname[:1].isdigit():
        os.close(fd)
        raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
    old = session.fds.get(args.fdname)
    if old is not None:
        with contextlib.suppress(OSError):
            os.close(old)
    session.fds[args.fdname] = fd
    return {}


class ClosefdArgs(QMPArgs):
    fdname: str


@command("closefd", ClosefdArgs)
def closefd(ctx: CommandContext, args: ClosefdArgs) -> dict[str, Any]:
    fd = ctx.session.fds.pop(args.fdname, None)
    if fd is None:
        raise QMPError(f"File descriptor named '{args.fdname}' not found")
    with contextlib.suppress(OSError):
        os.close(fd)
    return {}
