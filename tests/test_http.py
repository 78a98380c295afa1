"""The HTTP endpoint in-process: real aiohttp server, real sockets, real EventSink and run states.

The migration is a scripted ``query()`` source here (the endpoint's input is exactly that dict); the
end-to-end variant against a running migd lives in test_http_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scripted_daemon import DaemonParts

from migd.http.app import start_http
from migd.http.live import LiveFeed, make_sample
from migd.machine.runstate import RunState

ACTIVE = {
    "status": "active", "setup-time": 2, "total-time": 1500, "expected-downtime": 42,
    "cpu-throttle-percentage": 30,
    "ram": {"transferred": 123456789, "remaining": 50 << 20, "total": 1 << 30, "duplicate": 10, "normal": 30000,
            "normal-bytes": 30000 * 4096, "dirty-pages-rate": 2500, "mbps": 800.0, "dirty-sync-count": 3,
            "page-size": 4096, "precopy-bytes": 120000000, "downtime-bytes": 0, "postcopy-bytes": 0},
}
COMPLETED = {
    "status": "completed", "setup-time": 2, "total-time": 2100, "downtime": 57,
    "ram": dict(ACTIVE["ram"], remaining=0, **{"dirty-pages-rate": 0, "dirty-sync-count": 5}),
    "x-migd-downtime-phases": {"pause-vcpus": 1.5, "ram": 40.25},
}


@pytest.fixture
async def endpoint():
    daemon = DaemonParts()
    ep = await start_http(daemon, "127.0.0.1", 0, sample_interval=0.2)
    async with aiohttp.ClientSession(base_url=ep.url) as session:
        yield daemon, ep, session
    await ep.close()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, **labels) -> float:
    for sample in fams[name].samples:
        if sample.name in (name, name + "_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise KeyError((name, labels))


async def test_metrics_parse_and_follow_the_migration(endpoint):
    daemon, ep, session = endpoint
    async with session.get("/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        fams = families(await r.text())
    assert value(fams, "migd_migration_status", status="none") == 1.0
    assert "migd_migration_remaining_bytes" not in fams  # no migration: no figures, like query-migrate
    assert value(fams, "migd_guest_running") == 1.0
    assert value(fams, "migd_guest_runstate", state="running") == 1.0
    assert "migd_process_cpu_seconds" in fams

    daemon.migration.info = ACTIVE
    async with session.get("/metrics") as r:
        fams = families(await r.text())
    assert [s.labels["status"] for s in fams["migd_migration_status"].samples if s.value == 1] == ["active"]
    assert value(fams, "migd_migration_remaining_bytes") == 50 << 20
    assert fams["migd_migration_transferred_bytes"].type == "counter"
    assert value(fams, "migd_migration_transferred_bytes") == 123456789
    assert value(fams, "migd_migration_dirty_rate_bytes") == 2500 * 4096
    assert value(fams, "migd_migration_bandwidth_bytes") == 100_000_000
    assert value(fams, "migd_migration_expected_downtime_seconds") == pytest.approx(0.042)
    assert value(fams, "migd_migration_cpu_throttle_ratio") == pytest.approx(0.3)
    assert value(fams, "migd_migration_pages", kind="zero") == 10

    daemon.migration.info = COMPLETED
    async with session.get("/metrics") as r:
        fams = families(await r.text())
    assert value(fams, "migd_migration_downtime_seconds") == pytest.approx(0.057)
    assert value(fams, "migd_migration_downtime_phase_seconds", phase="ram") == pytest.approx(0.04025)
    assert "migd_migration_expected_downtime_seconds" not in fams


async def test_healthz_and_migration_json(endpoint):
    daemon, ep, session = endpoint
    daemon.migration.info = ACTIVE
    async with session.get("/api/v1/migration") as r:
        assert r.status == 200 and await r.json() == ACTIVE
    async with session.get("/healthz") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ok", "runstate": "running", "migration": "active"}
    daemon.runstate.set(RunState.INTERNAL_ERROR)
    async with session.get("/healthz") as r:
        assert r.status == 503 and (await r.json())["status"] == "error"


async def test_dashboard_files(endpoint):
    _, ep, session = endpoint
    async with session.get("/") as r:
        html = await r.text()
        assert r.status == 200 and r.content_type == "text/html"
    assert "/static/dashboard.js" in html and "chart-remaining" in html
    assert "http://" not in html and "https://" not in html  # nothing from outside: the network is closed
    async with session.get("/static/dashboard.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
        assert "EventSource" in await r.text()
    for bad in ("/static/nope.js", "/static/..%2Fapp.py", "/static/.hidden"):
        async with session.get(bad) as r:
            assert r.status == 404, bad


async def read_sse(response: aiohttp.ClientResponse):
    """Yields (event, data) from a text/event-stream body."""
    kind, data = None, []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and kind is not None:
            yield kind, json.loads("\n".join(data))
            kind, data = None, []


async def test_event_stream_history_samples_and_events(endpoint):
    daemon, ep, session = endpoint
    async with session.get("/api/v1/events") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        stream = read_sse(r)
        kind, history = await asyncio.wait_for(anext(stream), 10)
        assert kind == "history" and isinstance(history, list)
        daemon.migration.info = ACTIVE
        daemon.events.emit("MIGRATION", {"status": "active"})
        got_event = got_sample = None

        async def until_both():
            nonlocal got_event, got_sample
            async for kind, data in stream:
                if kind == "qmp":
                    got_event = data
                elif kind == "sample" and data["status"] == "active":
                    got_sample = data
                if got_event and got_sample:
                    return

        await asyncio.wait_for(until_both(), 10)
    assert got_event["event"] == "MIGRATION" and got_event["data"] == {"status": "active"}
    assert got_sample["remaining"] == 50 << 20 and got_sample["pass"] == 3
    assert got_sample["bandwidth"] == 100_000_000 and got_sample["expected_downtime"] == 42


async def test_close_ends_open_streams(endpoint):
    daemon, ep, session = endpoint
    async with session.get("/api/v1/events") as r:
        stream = read_sse(r)
        await asyncio.wait_for(anext(stream), 10)
        await asyncio.wait_for(ep.close(), 5)

        async def drain():
            async for _ in stream:
                pass

        await asyncio.wait_for(drain(), 5)  # the server ended the stream instead of hanging


async def test_slow_subscriber_is_dropped_not_waited_for():
    daemon = DaemonParts()
    feed = LiveFeed(daemon, interval=60)
    queue = feed.subscribe()
    for _ in range(queue.maxsize + 5):
        feed.sample_now()  # never blocks, whatever the subscriber does
    assert not feed.subscribed(queue)
    assert len(feed.history) == queue.maxsize + 5


def test_make_sample_units():
    s = make_sample(ACTIVE, "running", 100.0)
    assert s["dirty_rate"] == 2500 * 4096 and s["bandwidth"] == 1e8 and s["throttle"] == 30
    assert make_sample({}, "inmigrate", 1.0)["remaining"] is None
