"""QMP commands of the outgoing migration: thin wrappers over ``daemon.migration`` (MigrationState).

Arguments are strict pydantic models (QEMU's visitor texts for bad types come from ``QMPArgs``); the
semantic checks and QEMU's refusals live in ``migd.migration`` so they hold whoever calls them.
``migrate-incoming`` belongs to ``incoming.py``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Strict, create_model

from migd.migration.info import query_migrate
from migd.migration.params import CAPABILITIES, PARAMS, ParamError, ParamSpec
from migd.migration.state import MigrationError, MigrationState
from migd.migration.status import MigrationStatus
from migd.qmp.registry import CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs, Size, UInt8, UInt32, UInt64

CapabilityName = Literal[CAPABILITIES]  # type: ignore[valid-type]  # built from the one list


class MigrateArgs(QMPArgs):
    uri: str | None = None
    channels: list[dict[str, Any]] | None = None
    detach: bool = False  # ignored, as in QEMU
    resume: bool = False


_KIND_TYPES: dict[str, Any] = {"size": Size, "uint64": UInt64, "uint32": UInt32, "uint8": UInt8,
                               "bool": bool, "str": str, "list": list[dict[str, Any]]}


def _field_type(spec: ParamSpec) -> Any:
    if spec.kind == "enum":
        return Literal[spec.choices]
    return _KIND_TYPES[spec.kind]


# MigrateSetParameters (boxed): every member of ``params.PARAMS`` optional; the str ones are
# StrOrNull (null means ""). Built from that one list, so a parameter is declared once.
_SET_FIELDS: dict[str, Any] = {spec.name.replace("-", "_"): (_field_type(spec) | None, None) for spec in PARAMS}
MigrateSetParametersArgs: type[QMPArgs] = create_model("MigrateSetParametersArgs", __base__=QMPArgs,
                                                       **_SET_FIELDS)


class CapabilityStatus(QMPArgs):
    capability: CapabilityName
    state: bool


class MigrateSetCapabilitiesArgs(QMPArgs):
    capabilities: list[CapabilityStatus]


class MigrateContinueArgs(QMPArgs):
    state: Annotated[MigrationStatus, Strict(False)]


def _migration(ctx: CommandContext) -> MigrationState:
    return ctx.daemon.migration


@command("migrate", MigrateArgs)
async def qmp_migrate(ctx: CommandContext, args: MigrateArgs) -> dict[str, Any]:
    try:
        await _migration(ctx).start(args.uri, args.channels, ctx.session.fds, args.resume)
    except MigrationError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("migrate_cancel")
async def qmp_migrate_cancel(ctx: CommandContext, args: None) -> dict[str, Any]:
    try:
        await _migration(ctx).cancel()
    except MigrationError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("migrate-continue", MigrateContinueArgs)
def qmp_migrate_continue(ctx: CommandContext, args: MigrateContinueArgs) -> dict[str, Any]:
    try:
        _migration(ctx).continue_(args.state)
    except MigrationError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("query-migrate")
def qmp_query_migrate(ctx: CommandContext, args: None) -> dict[str, Any]:
    return query_migrate(_migration(ctx), ctx.daemon.incoming)


@command("migrate-set-parameters", MigrateSetParametersArgs)
def qmp_migrate_set_parameters(ctx: CommandContext, args: QMPArgs) -> dict[str, Any]:
    fields = type(args).model_fields
    changes = {fields[name].alias or name: getattr(args, name) for name in args.model_fields_set}
    try:
        _migration(ctx).set_parameters(changes)
    except ParamError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("query-migrate-parameters")
def qmp_query_migrate_parameters(ctx: CommandContext, args: None) -> dict[str, Any]:
    return _migration(ctx).config.query_parameters()


@command("migrate-set-capabilities", MigrateSetCapabilitiesArgs)
def qmp_migrate_set_capabilities(ctx: CommandContext, args: MigrateSetCapabilitiesArgs) -> dict[str, Any]:
    try:
        _migration(ctx).set_capabilities([(c.capability, c.state) for c in args.capabilities])
    except ParamError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("query-migrate-capabilities")
def qmp_query_migrate_capabilities(ctx: CommandContext, args: None) -> list[dict[str, Any]]:
    return _migration(ctx).config.query_capabilities()


@command("migrate-start-postcopy")
def qmp_migrate_start_postcopy(ctx: CommandContext, args: None) -> dict[str, Any]:
    ms = _migration(ctx)
    if not ms.config.cap("postcopy-ram"):  # migd never enables it, so this is the answer
        raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")
    if ms.status is MigrationStatus.NONE:
        raise QMPError("Postcopy must be started after migration has been started")
    raise QMPError("Postcopy is not supported by migd")


@command("migrate-pause", allow_oob=True)
def qmp_migrate_pause(ctx: CommandContext, args: None) -> dict[str, Any]:
    raise QMPError("migrate-pause is currently only supported during postcopy-active or "
                   "postcopy-recover state")
