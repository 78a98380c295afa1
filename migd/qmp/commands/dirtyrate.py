"""QMP ``calc-dirty-rate`` and ``query-dirty-rate`` (QEMU's arguments, answers and texts) over
``migration.dirtyrate.DirtyRateMeter``, one meter per daemon."""

from __future__ import annotations

import weakref
from typing import Any, Literal

from migd.migration.dirtyrate import DirtyRateError, DirtyRateMeter
from migd.qmp.registry import CommandContext, QMPError, command
from migd.qmp.schema import Int64, QMPArgs

_METERS: weakref.WeakKeyDictionary[Any, DirtyRateMeter] = weakref.WeakKeyDictionary()


class CalcDirtyRateArgs(QMPArgs):
    calc_time: Int64
    calc_time_unit: Literal["second", "millisecond"] | None = None
    sample_pages: Int64 | None = None
    mode: Literal["page-sampling", "dirty-ring", "dirty-bitmap"] | None = None


class QueryDirtyRateArgs(QMPArgs):
    calc_time_unit: Literal["second", "millisecond"] | None = None


def _meter(ctx: CommandContext) -> DirtyRateMeter:
    daemon = ctx.daemon
    meter = _METERS.get(daemon)
    if meter is None:
        meter = DirtyRateMeter(lambda: daemon.machine.ram.blocks(), daemon.run_blocking)
        _METERS[daemon] = meter
    return meter


@command("calc-dirty-rate", CalcDirtyRateArgs)
def qmp_calc_dirty_rate(ctx: CommandContext, args: CalcDirtyRateArgs) -> dict[str, Any]:
    try:
        _meter(ctx).start(args.calc_time, args.calc_time_unit, args.sample_pages, args.mode)
    except DirtyRateError as exc:
        raise QMPError(str(exc)) from None
    return {}


@command("query-dirty-rate", QueryDirtyRateArgs)
def qmp_query_dirty_rate(ctx: CommandContext, args: QueryDirtyRateArgs) -> dict[str, Any]:
    return _meter(ctx).query(args.calc_time_unit)
