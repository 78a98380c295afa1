"""Commands on a machine held as data (a QEMU guest received by a migd; ``migd/migration/foreign.py``).

``x-migd-query-foreign`` shows what is held (machine type, RAM blocks, device sections; also what
``x-migd-query-machine`` shows on such a daemon, ``foreign_machine_info``);
``x-migd-ram-save`` writes a range of a RAM block to a file, QEMU's ``memsave``/``pmemsave`` for
blocks: it works on the held machine's blocks and, failing that, on migd's own machine's.
"""

from __future__ import annotations

import os
from typing import Any

from migd.migration.foreign import ForeignMachine
from migd.qmp.registry import CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs, UInt64


class RamSaveArgs(QMPArgs):
    block: str
    filename: str
    offset: UInt64 = 0
    size: UInt64 | None = None


def held_machine(ctx: CommandContext) -> ForeignMachine | None:
    """The foreign machine the daemon holds or is receiving, if any."""
    incoming = ctx.daemon.incoming
    return incoming.foreign if incoming is not None else None


def foreign_machine_info(ctx: CommandContext, held: ForeignMachine) -> dict[str, Any]:
    """(event loop) ``x-migd-query-machine`` on a daemon holding a foreign machine: its type, RAM
    blocks and device sections (what has arrived so far while it is still loading)."""
    blocks = held.ram.blocks()
    return {"name": held.machine_type, "machine-type": held.machine_type, "foreign": True,
            "loaded": held.loaded.is_set(), "status": str(ctx.daemon.runstate.state),
            "ram": {"version": held.ram.version, "total": held.ram.total_bytes(),
                    "blocks": [{"name": b.name, "size": b.size, "page-size": b.page_size} for b in blocks],
                    "dirty-logging": held.ram.logging},
            "devices": [d.describe() for d in list(held.devices)]}


@command("x-migd-query-foreign")
def query_foreign(ctx: CommandContext, args: None) -> dict[str, Any]:
    """(event loop) The held machine's description; an error when none is held."""
    held = held_machine(ctx)
    if held is None:
        raise QMPError("No foreign machine is held")
    result: dict[str, Any] = held.describe()
    return result


def _find_block(ctx: CommandContext, name: str) -> Any:
    held = held_machine(ctx)
    block = held.ram.get(name) if held is not None else None
    if block is None:
        block = ctx.daemon.machine.ram.get(name)
    if block is None:
        raise QMPError(f"RAM block '{name}' not found", "DeviceNotFound")
    return block


def _save(block: Any, offset: int, size: int, filename: str) -> None:
    """(worker thread) Write ``size`` bytes of the block from ``offset`` to ``filename``."""
    try:
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise QMPError(f"Could not open '{filename}': {exc.strerror}") from None
    try:
        view = memoryview(block.buf)[offset : offset + size]
        done = 0
        while done < size:
            n = os.write(fd, view[done : done + (16 << 20)])
            if n <= 0:
                raise QMPError(f"writing memory to '{filename}' failed")
            done += n
    except OSError as exc:
        raise QMPError(f"writing memory to '{filename}' failed: {exc.strerror}") from None
    finally:
        os.close(fd)


@command("x-migd-ram-save", RamSaveArgs)
async def ram_save(ctx: CommandContext, args: RamSaveArgs) -> dict[str, Any]:
    """(event loop; the copy runs on a worker thread) Save a block's bytes to a file."""
    block = _find_block(ctx, args.block)
    size = block.size - args.offset if args.size is None else args.size
    if args.offset > block.size or size > block.size - args.offset:
        raise QMPError(f"Invalid parameter 'offset'/'size': 0x{args.offset:x}+0x{size:x} is beyond "
                       f"the 0x{block.size:x} bytes of '{args.block}'")
    await ctx.daemon.run_blocking(_save, block, args.offset, size, args.filename)
    return {}
