"""Prometheus metrics read from the daemon at scrape time.

A custom collector rather than metric objects updated by the data plane: the migration thread never
pays for monitoring, a scrape reads the same published counters ``query-migrate`` reads, and a scrape
can never see a value older than the last counter update. Names follow Prometheus conventions
(``migd_`` prefix, base units: bytes and seconds, ``_total`` for counters).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from migd import __version__
from migd.http.host import HttpHost
from migd.machine.runstate import RunState
from migd.migration.info import query_migrate
from migd.migration.status import MigrationStatus
from migd.units import PAGE_SIZE

# QEMU's MigrationStatus values (qapi enum order): every one is exported so a status panel needs no guessing.
MIGRATION_STATUSES = tuple(str(status) for status in MigrationStatus)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def migration_info(daemon: HttpHost) -> dict[str, Any]:
    """query-migrate as the daemon answers it (the source's view, or the destination's when idle)."""
    return query_migrate(daemon.migration, daemon.incoming)


def incoming_info(daemon: HttpHost) -> dict[str, Any]:
    """The destination's query-migrate answer with its progress as ``x-migd-incoming``; ``{}`` on a
    daemon that never had an incoming migration."""
    incoming = daemon.incoming
    if incoming is None:
        return {}
    info = incoming.query()
    if info:
        info["x-migd-incoming"] = incoming.progress()
    return info


def api_info(daemon: HttpHost) -> dict[str, Any]:
    """``/api/v1/migration``: query-migrate's answer; when that is the destination's (the source side
    never ran), with the destination's progress as ``x-migd-incoming``."""
    info = daemon.migration.query()
    return info if info else incoming_info(daemon)


def _gauge(name: str, doc: str, value: float | int | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float | int | None) -> Iterator[Metric]:
    if value is not None:
        yield CounterMetricFamily(name, doc, value=float(value))


def _seconds(ms: Any) -> float | None:
    return ms / 1000.0 if isinstance(ms, int | float) else None


def _status_gauge(name: str, doc: str, info: dict[str, Any]) -> Metric:
    """One sample per QEMU status, 1 for the one ``info`` is in (a status panel needs no guessing)."""
    status = info.get("status", "none")
    g = GaugeMetricFamily(name, doc, labels=["status"])
    for value in MIGRATION_STATUSES:
        g.add_metric([value], 1.0 if value == status else 0.0)
    return g


def migration_metrics(info: dict[str, Any]) -> Iterator[Metric]:
    """The query-migrate answer as metrics; absent members give absent metrics (as in QEMU's answer)."""
    yield _status_gauge("migd_migration_status", "1 for the current migration status (QEMU's names)", info)
    ram = info.get("ram") or {}
    page = ram.get("page-size", PAGE_SIZE)
    yield from _gauge("migd_migration_remaining_bytes", "RAM still to send (query-migrate ram.remaining)",
                      ram.get("remaining"))
    yield from _gauge("migd_migration_ram_total_bytes", "guest RAM being migrated (ram.total)", ram.get("total"))
    yield from _counter("migd_migration_transferred_bytes", "bytes written to the migration channel",
                        ram.get("transferred"))
    rate = ram.get("dirty-pages-rate")
    yield from _gauge("migd_migration_dirty_rate_bytes", "bytes per second the guest dirties (last period)",
                      None if rate is None else rate * page)
    mbps = ram.get("mbps")
    yield from _gauge("migd_migration_bandwidth_bytes", "measured migration bandwidth, bytes per second",
                      None if mbps is None else mbps * 1e6 / 8)
    yield from _counter("migd_migration_dirty_syncs", "dirty-bitmap syncs (passes) of this migration",
                        ram.get("dirty-sync-count"))
    if ram:
        pages = CounterMetricFamily("migd_migration_pages", "pages sent, by encoding", labels=["kind"])
        pages.add_metric(["normal"], float(ram.get("normal", 0)))
        pages.add_metric(["zero"], float(ram.get("duplicate", 0)))
        yield pages
        phase = CounterMetricFamily("migd_migration_ram_bytes", "RAM bytes sent, by guest state",
                                    labels=["phase"])
        phase.add_metric(["precopy"], float(ram.get("precopy-bytes", 0)))
        phase.add_metric(["downtime"], float(ram.get("downtime-bytes", 0)))
        phase.add_metric(["postcopy"], float(ram.get("postcopy-bytes", 0)))
        yield phase
    yield from _gauge("migd_migration_expected_downtime_seconds", "the thread's current downtime estimate",
                      _seconds(info.get("expected-downtime")))
    yield from _gauge("migd_migration_downtime_seconds", "downtime of the completed migration",
                      _seconds(info.get("downtime")))
    yield from _gauge("migd_migration_total_time_seconds", "time since the migration started (or its total)",
                      _seconds(info.get("total-time")))
    yield from _gauge("migd_migration_setup_time_seconds", "time spent in setup", _seconds(info.get("setup-time")))
    throttle = info.get("cpu-throttle-percentage")
    yield from _gauge("migd_migration_cpu_throttle_ratio", "auto-converge vCPU throttle (0..1)",
                      None if throttle is None else throttle / 100.0)
    phases = info.get("x-migd-downtime-phases")
    if phases:
        g = GaugeMetricFamily("migd_migration_downtime_phase_seconds", "time of each completion phase",
                              labels=["phase"])
        for name, ms in phases.items():
            if isinstance(ms, int | float):
                g.add_metric([str(name)], ms / 1000.0)
        yield g


def incoming_metrics(info: dict[str, Any]) -> Iterator[Metric]:
    """The destination side (``incoming_info``): its status and what arrived; nothing without one."""
    if not info:
        return
    yield _status_gauge("migd_incoming_status", "1 for the incoming migration's status (QEMU's names)", info)
    progress = info.get("x-migd-incoming") or {}
    yield from _counter("migd_incoming_received_bytes", "migration stream bytes received and parsed",
                        progress.get("received"))
    if "pages" in progress:
        pages = CounterMetricFamily("migd_incoming_pages", "RAM pages loaded, by record kind", labels=["kind"])
        pages.add_metric(["normal"], float(progress.get("pages", 0)))
        pages.add_metric(["zero"], float(progress.get("zero-pages", 0)))
        yield pages
    yield from _gauge("migd_incoming_setup_time_seconds", "time listening before the source connected",
                      _seconds(progress.get("setup-time")))
    yield from _gauge("migd_incoming_load_time_seconds", "time since the source connected (or until the end)",
                      _seconds(progress.get("load-time")))
    yield from _gauge("migd_incoming_total_time_seconds", "time since migrate-incoming (or until the end)",
                      _seconds(progress.get("total-time")))


def guest_metrics(daemon: HttpHost) -> Iterator[Metric]:
    state = str(daemon.runstate.state)
    g = GaugeMetricFamily("migd_guest_runstate", "1 for the current run state (QEMU's names)", labels=["state"])
    for name in RunState:
        g.add_metric([str(name)], 1.0 if str(name) == state else 0.0)
    yield g
    yield from _gauge("migd_guest_running", "1 while the guest runs", 1 if state == RunState.RUNNING else 0)
    machine = daemon.machine
    if machine is None:
        return
    yield from _gauge("migd_guest_ram_bytes", "guest RAM, all blocks", machine.ram.total_bytes())
    vcpus = list(machine.vcpus)
    yield from _gauge("migd_guest_vcpus", "vCPU threads", len(vcpus))
    stats = [v.stats for v in vcpus]
    yield from _gauge("migd_guest_max_stall_seconds", "largest gap between two vCPU slices the guest felt",
                      max((s.largest_stall for s in stats), default=0.0))
    yield from _counter("migd_guest_ram_written_bytes", "bytes the workload wrote to guest RAM",
                        sum(s.bytes_written for s in stats))
    yield from _counter("migd_guest_disk_written_bytes", "bytes the workload wrote to its drives",
                        sum(s.disk_bytes_written for s in stats))


class MigdCollector(Collector):
    """Reads the daemon on every scrape (on the event loop, so state is consistent with QMP's view)."""

    def __init__(self, daemon: HttpHost) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("migd_info", "migd version and machine name", labels=["version", "name"])
        machine = self.daemon.machine
        name = machine.config.name if machine is not None else None
        info.add_metric([__version__, name or ""], 1.0)
        yield info
        yield from guest_metrics(self.daemon)
        yield from migration_metrics(migration_info(self.daemon))
        yield from incoming_metrics(incoming_info(self.daemon))


def make_registry(daemon: HttpHost) -> CollectorRegistry:
    """A registry of its own per endpoint: no global state shared between daemons in one process (tests)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MigdCollector(daemon))
    ProcessCollector(namespace="migd", registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
