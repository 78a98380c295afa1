"""``object-add`` / ``object-del``: QEMU's argument shape (``qom-type``, ``id``, the type's properties
flat beside them) for the objects migd has: ``tls-creds-x509`` and ``authz-simple`` (migd/objects.py)."""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict

from migd.objects import ObjectError
from migd.qmp.registry import CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs


class ObjectAddArgs(QMPArgs):
    """The properties are the type's own, so the model is open beyond ``qom-type`` and ``id``."""

    model_config = ConfigDict(extra="allow")

    qom_type: str
    id: str


class ObjectDelArgs(QMPArgs):
    id: str


@command("object-add", ObjectAddArgs)
async def object_add(ctx: CommandContext, args: ObjectAddArgs) -> dict[str, Any]:
    """Create and register; reading the certificate files runs off the event loop."""
    props = dict(args.model_extra or {})
    registry = ctx.daemon.migration.config.objects
    try:
        await ctx.daemon.run_blocking(registry.add, args.qom_type, args.id, props)
    except ObjectError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("object-del", ObjectDelArgs)
def object_del(ctx: CommandContext, args: ObjectDelArgs) -> dict[str, Any]:
    try:
        ctx.daemon.migration.config.objects.delete(args.id)
    except ObjectError as exc:
        raise QMPError(str(exc)) from None
    return {}
