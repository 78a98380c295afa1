"""QMP ``calc-dirty-rate`` and ``query-dirty-rate`` (QEMU's arguments, answers and texts) over
the daemon's ``migration.dirtyrate.DirtyRateMeter`` (``ctx.daemon.dirty_rate``)."""

from __future__ import annotations

from typing import Any, Literal

from migd.migration.dirtyrate import DirtyRateError
from migd.qmp.registry import CommandContext, QMPError, command
from migd.qmp.schema import Int64, QMPArgs


class CalcDirtyRateArgs(QMPArgs):
    calc_time: Int64
    calc_time_unit: Literal["second", "millisecond"] | None = None
    sample_pages: Int64 | None = None
    mode: Literal["page-sampling", "dirty-ring", "dirty-bitmap"] | None = None


class QueryDirtyRateArgs(QMPArgs):
    calc_time_unit: Literal["second", "millisecond"] | None = None


@command("calc-dirty-rate", CalcDirtyRateArgs)
def qmp_calc_dirty_rate(ctx: CommandContext, args: CalcDirtyRateArgs) -> dict[str, Any]:
    try:
        ctx.daemon.dirty_rate.start(args.calc_time, args.calc_time_unit, args.sample_pages, args.mode)
    except DirtyRateError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("query-dirty-rate", QueryDirtyRateArgs)
def qmp_query_dirty_rate(ctx: CommandContext, args: QueryDirtyRateArgs) -> dict[str, Any]:
    return ctx.daemon.dirty_rate.query(args.calc_time_unit)
