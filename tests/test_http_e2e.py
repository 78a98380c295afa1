"""The HTTP endpoint of a real migd process (``--http 127.0.0.1:0``): metrics, health and the
migration JSON agree with what QMP says, before, during and after a migration."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
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
