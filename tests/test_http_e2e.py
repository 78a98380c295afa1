"""The HTTP endpoint of a real migd process (``--http 127.0.0.1:0``): metrics, health and the
migration JSON agree with what QMP says, before, during and after a migration."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from helpers import hold_active, release_hold
from prometheus_client.parser import text_string_to_metric_families


def http_port(vm) -> int:
    found = vm.wait_for(lambda: re.search(r"http endpoint on http://[^:]+:(\d+)/", vm.log()),
                        what="the HTTP endpoint's log line")
    return int(found.group(1))


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(port: int) -> dict[tuple[str, tuple], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_health_and_json_of_a_running_daemon(migd_factory):
    vm = migd_factory("web", "-m", "32M", "--workload", "random,rate=8M", "--http", "127.0.0.1:0")
    port = http_port(vm)
    m = metrics(port)
    assert m[("migd_guest_ram_bytes", ())] == 32 << 20
    assert m[("migd_guest_running", ())] == 1
    assert m[("migd_guest_runstate", (("state", "running"),))] == 1
    assert m[("migd_migration_status", (("status", "none"),))] == 1
    assert ("migd_guest_max_stall_seconds", ()) in m
    vm.wait_for(lambda: metrics(port)[("migd_guest_ram_written_bytes_total", ())] > 0,
                what="the workload's bytes to show in the metrics")
    assert m[("migd_info", (("name", "web"), ("version", "0.1.0")))] == 1
    status, body = get(port, "/api/v1/migration")
    assert status == 200 and json.loads(body) == vm.cmd("query-migrate")
    status, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["runstate"] == "running"
    vm.cmd("stop")
    m = metrics(port)
    assert m[("migd_guest_running", ())] == 0 and m[("migd_guest_runstate", (("state", "paused"),))] == 1
    status, page = get(port, "/")
    assert status == 200 and "chart-remaining" in page


@pytest.mark.e2e
def test_metrics_after_a_migration(migd_factory):
    dst = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = migd_factory("src", "-m", "32M", "--workload", "random,rate=8M", "--http", "127.0.0.1:0")
    port = http_port(src)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"unix:{sock}")
    src.wait_for(lambda: src.cmd("query-migrate").get("status") in ("completed", "failed"),
                 timeout=120, what="the migration to end")
    info = src.cmd("query-migrate")
    assert info["status"] == "completed"
    m = metrics(port)
    assert m[("migd_migration_status", (("status", "completed"),))] == 1
    assert m[("migd_migration_transferred_bytes_total", ())] == info["ram"]["transferred"]
    assert m[("migd_migration_remaining_bytes", ())] == 0
    assert m[("migd_migration_downtime_seconds", ())] == pytest.approx(info["downtime"] / 1000)
    for phase, ms in info.get("x-migd-downtime-phases", {}).items():
        assert m[("migd_migration_downtime_phase_seconds", (("phase", phase),))] == pytest.approx(ms / 1000)
    assert m[("migd_guest_runstate", (("state", "postmigrate"),))] == 1


@pytest.mark.e2e
def test_destination_exports_incoming_progress(migd_factory):
    """A destination's /metrics and /api/v1/migration show the incoming migration: status, bytes received,
    pages loaded (data and zero), and its timings, while it loads and after it completed."""
    dst = migd_factory("dst", "-m", "64M", "--incoming", "defer", "--http", "127.0.0.1:0")
    port = http_port(dst)
    m = metrics(port)
    assert not any(name.startswith("migd_incoming_") for name, _ in m)  # nothing before migrate-incoming
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    m = metrics(port)
    assert m[("migd_incoming_status", (("status", "setup"),))] == 1
    assert m[("migd_incoming_received_bytes_total", ())] == 0
    status, body = get(port, "/api/v1/migration")
    api = json.loads(body)
    assert api["status"] == "setup" and api["x-migd-incoming"]["received"] == 0
    assert dst.cmd("query-migrate") == {k: v for k, v in api.items() if k != "x-migd-incoming"}

    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=32M,wss=32M")
    # pages with data to send (untouched ones go as 9-byte zero records)
    src.wait_for(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 48 << 20,
                 what="the guest to fill its working set")
    hold_active(src)  # until the destination was seen loading
    src.cmd("migrate", uri=f"unix:{sock}")
    loading = dst.wait_for(lambda: (lambda m: m if m.get(("migd_incoming_status", (("status", "active"),))) == 1
                                    and m[("migd_incoming_received_bytes_total", ())] > (1 << 20) else None)(
        metrics(port)), what="the destination to show bytes received while active")
    release_hold(src)
    assert loading[("migd_incoming_pages_total", (("kind", "normal"),))] + \
        loading[("migd_incoming_pages_total", (("kind", "zero"),))] > 0
    assert loading[("migd_incoming_load_time_seconds", ())] > 0
    assert loading[("migd_incoming_total_time_seconds", ())] >= loading[("migd_incoming_setup_time_seconds", ())]
    src.wait_for(lambda: src.cmd("query-migrate").get("status") in ("completed", "failed"),
                 timeout=120, what="the migration to end")
    info = src.cmd("query-migrate")
    assert info["status"] == "completed"
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", what="the destination to complete")
    m = metrics(port)
    assert m[("migd_incoming_status", (("status", "completed"),))] == 1
    assert m[("migd_incoming_status", (("status", "active"),))] == 0
    normal = m[("migd_incoming_pages_total", (("kind", "normal"),))]
    zero = m[("migd_incoming_pages_total", (("kind", "zero"),))]
    assert normal == info["ram"]["normal"] and zero == info["ram"]["duplicate"]  # every record the source sent
    assert normal + zero >= (64 << 20) // 4096  # each page at least once
    received = m[("migd_incoming_received_bytes_total", ())]
    assert normal * 4096 < received <= info["ram"]["transferred"] + (1 << 20)
    total = m[("migd_incoming_total_time_seconds", ())]
    assert total == pytest.approx(m[("migd_incoming_setup_time_seconds", ())]
                                  + m[("migd_incoming_load_time_seconds", ())], abs=0.002)
    status, body = get(port, "/api/v1/migration")
    api = json.loads(body)["x-migd-incoming"]
    assert api["received"] == received and api["pages"] == normal and api["total-time"] == round(total * 1000)
    assert metrics(port)[("migd_incoming_total_time_seconds", ())] == total  # stopped at the end
