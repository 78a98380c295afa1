"""``migrate-incoming``: start the destination of a daemon run with ``--incoming defer``."""

from __future__ import annotations

from typing import Any

from migd.migration.incoming import IncomingError
from migd.qmp.registry import CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs
from migd.transports import TransportError, URIError, resolve


class MigrateIncomingArgs(QMPArgs):
    uri: str | None = None
    channels: list[dict[str, Any]] | None = None
    exit_on_error: bool = True  # wire name "exit-on-error"; QEMU's default since 9.1


@command("migrate-incoming", MigrateIncomingArgs)
async def migrate_incoming(ctx: CommandContext, args: MigrateIncomingArgs) -> dict[str, Any]:
    """QEMU's order: refusals first (once only, -incoming needed), then the address, then listen."""
    incoming = ctx.daemon.incoming
    if incoming is None:
        raise QMPError("'-incoming' was not specified on the command line")
    try:
        incoming.check_can_start()
        uri = resolve(args.uri, args.channels, incoming=True)
        await incoming.start_deferred(uri, args.exit_on_error, ctx.session.fds)
    except (IncomingError, URIError, TransportError) as exc:
        raise QMPError(str(exc)) from exc
    return {}
