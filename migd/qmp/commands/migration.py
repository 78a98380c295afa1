"""QMP commands of the outgoing migration: thin wrappers over ``daemon.migration`` (MigrationState).

Arguments are strict pydantic models (QEMU's visitor texts for bad types come from ``QMPArgs``); the
semantic checks and QEMU's refusals live in ``migd.migration`` so they hold whoever calls them.
``migrate-incoming`` belongs to ``incoming.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from migd.migration.params import CAPABILITIES, ParamError
from migd.migration.state import MigrationError, MigrationStatus
from migd.qmp.commands import CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs, Size, UInt8, UInt32, UInt64

CapabilityName = Literal[CAPABILITIES]  # type: ignore[valid-type]
StatusName = Literal[tuple(str(s) for s in MigrationStatus)]  # type: ignore[valid-type]


class MigrateArgs(QMPArgs):
    uri: str | None = None
    channels: list[dict[str, Any]] | None = None
    detach: bool = False  # ignored, as in QEMU
    resume: bool = False


class MigrateSetParametersArgs(QMPArgs):
    """MigrateSetParameters (boxed): every member optional; tls-* are StrOrNull (null means "")."""

    announce_initial: Size | None = None
    announce_max: Size | None = None
    announce_rounds: Size | None = None
    announce_step: Size | None = None
    throttle_trigger_threshold: UInt8 | None = None
    cpu_throttle_initial: UInt8 | None = None
    cpu_throttle_increment: UInt8 | None = None
    cpu_throttle_tailslow: bool | None = None
    tls_creds: str | None = None
    tls_hostname: str | None = None
    tls_authz: str | None = None
    max_bandwidth: Size | None = None
    avail_switchover_bandwidth: Size | None = None
    downtime_limit: UInt64 | None = None
    x_checkpoint_delay: UInt32 | None = None
    multifd_channels: UInt8 | None = None
    xbzrle_cache_size: Size | None = None
    max_postcopy_bandwidth: Size | None = None
    max_cpu_throttle: UInt8 | None = None
    multifd_compression: Literal["none", "zlib", "zstd", "qatzip", "qpl", "uadk"] | None = None
    multifd_zlib_level: UInt8 | None = None
    multifd_qatzip_level: UInt8 | None = None
    multifd_zstd_level: UInt8 | None = None
    block_bitmap_mapping: list[dict[str, Any]] | None = None
    x_vcpu_dirty_limit_period: UInt64 | None = None
    vcpu_dirty_limit: UInt64 | None = None
    mode: Literal["normal", "cpr-reboot", "cpr-transfer"] | None = None
    zero_page_detection: Literal["none", "legacy", "multifd"] | None = None
    direct_io: bool | None = None
    x_migd_peer_timeout: UInt32 | None = None  # [migd] seconds


class CapabilityStatus(QMPArgs):
    capability: CapabilityName
    state: bool


class MigrateSetCapabilitiesArgs(QMPArgs):
    capabilities: list[CapabilityStatus]


class MigrateContinueArgs(QMPArgs):
    state: StatusName


def _migration(ctx: CommandContext) -> Any:
    return ctx.daemon.migration


@command("migrate", MigrateArgs)
async def qmp_migrate(ctx: CommandContext, args: MigrateArgs) -> dict[str, Any]:
    try:
        await _migration(ctx).start(args.uri, args.channels, getattr(ctx.session, "fds", None),
                                    args.resume)
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
    return _migration(ctx).query()


@command("migrate-set-parameters", MigrateSetParametersArgs)
def qmp_migrate_set_parameters(ctx: CommandContext, args: MigrateSetParametersArgs) -> dict[str, Any]:
    changes = {
        MigrateSetParametersArgs.model_fields[name].alias or name: getattr(args, name)
        for name in args.model_fields_set
    }
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
