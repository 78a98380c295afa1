"""Rich renderings of query-migrate answers: the live progress panel and the final summary.

Kept apart from the polling loop so the same tables serve ``migrate --wait``, ``status`` and the demo.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from migd.units import PAGE_SIZE


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_ms(ms: float | int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.0f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def bandwidth_bytes(info: dict[str, Any]) -> float | None:
    """ram.mbps (megabits/s, QEMU's unit) as bytes per second."""
    ram = info.get("ram") or {}
    mbps = ram.get("mbps")
    return None if mbps is None else mbps * 1e6 / 8


def dirty_rate_bytes(info: dict[str, Any]) -> int | None:
    ram = info.get("ram") or {}
    rate = ram.get("dirty-pages-rate")
    return None if rate is None else rate * ram.get("page-size", PAGE_SIZE)


def _rate(bps: float | None) -> str:
    return "-" if bps is None else f"{human_bytes(bps)}/s"


def progress_view(info: dict[str, Any], percent: float, elapsed: float | None = None, eta: str | None = None,
                  warning: str | None = None) -> Group:
    """The live panel: a bar, the figures an operator watches while a migration converges, elapsed
    time and ETA, and the not-converging warning when there is one."""
    ram = info.get("ram") or {}
    status = info.get("status", "none")
    bar = ProgressBar(total=100.0, completed=percent, width=50)
    head = Text.assemble((f"{status:<10}", "bold"), f" {percent:5.1f}%  ")
    line = Table.grid(padding=(0, 1))
    timing = Text("")
    if elapsed is not None:
        timing = Text(f" elapsed {elapsed:.1f} s" + (f"  ETA {eta}" if eta is not None else ""))
    line.add_row(head, bar, timing)
    figures = Table.grid(padding=(0, 2))
    figures.add_row(
        f"transferred {human_bytes(ram.get('transferred'))}",
        f"remaining {human_bytes(ram.get('remaining'))} of {human_bytes(ram.get('total'))}",
        f"pass {ram.get('dirty-sync-count', '-')}",
    )
    throttle = info.get("cpu-throttle-percentage")
    figures.add_row(
        f"bandwidth {_rate(bandwidth_bytes(info))}",
        f"dirty rate {_rate(dirty_rate_bytes(info))}",
        f"expected downtime {human_ms(info.get('expected-downtime'))}"
        + (f"  throttle {throttle}%" if throttle is not None else ""),
    )
    if warning is not None:
        return Group(line, figures, Text(f"warning: {warning}", style="bold yellow"))
    return Group(line, figures)


def summary_table(info: dict[str, Any], downtime_limit: int | None = None) -> Table:
    """The end-of-migration table, downtime phases included."""
    ram = info.get("ram") or {}
    table = Table(title="migration summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("status", str(info.get("status", "none")))
    if "error-desc" in info:
        table.add_row("error", str(info["error-desc"]))
    table.add_row("total time", human_ms(info.get("total-time")))
    table.add_row("setup time", human_ms(info.get("setup-time")))
    downtime = human_ms(info.get("downtime"))
    if downtime_limit is not None and "downtime" in info:
        downtime += f" (limit {downtime_limit} ms)"
    table.add_row("downtime", downtime)
    if ram:
        table.add_row("transferred", human_bytes(ram.get("transferred")))
        table.add_row("guest RAM", human_bytes(ram.get("total")))
        table.add_row("throughput", f"{ram.get('mbps', 0):.0f} Mbit/s ({_rate(bandwidth_bytes(info))})")
        table.add_row("pages sent / zero", f"{ram.get('normal', 0)} / {ram.get('duplicate', 0)}")
        table.add_row("passes", str(ram.get("dirty-sync-count", "-")))
        table.add_row("sent while stopped", human_bytes(ram.get("downtime-bytes")))
    phases = info.get("x-migd-downtime-phases") or {}
    for name, ms in phases.items():
        table.add_row(f"  phase {name}", f"{ms:.1f} ms" if isinstance(ms, int | float) else str(ms))
    return table


def status_table(status: dict[str, Any], info: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("guest", f"{status.get('status', '?')} (running: {str(status.get('running')).lower()})")
    table.add_row("migration", str(info.get("status", "none")))
    ram = info.get("ram")
    if ram:
        table.add_row("remaining", f"{human_bytes(ram.get('remaining'))} of {human_bytes(ram.get('total'))}")
        table.add_row("transferred", human_bytes(ram.get("transferred")))
        table.add_row("pass", str(ram.get("dirty-sync-count")))
    for key in ("expected-downtime", "downtime", "total-time"):
        if key in info:
            table.add_row(key, human_ms(info[key]))
    if "error-desc" in info:
        table.add_row("error", str(info["error-desc"]))
    return table
