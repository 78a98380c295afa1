"""The dashboard in a real headless Chromium, driven over the DevTools protocol (a few lines of CDP over
aiohttp's websocket client): the page loads, its charts move while a migration runs, passes are marked,
the final state shows, and the console stays free of errors. Skips where Chromium is not installed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import time
import zlib
from typing import Any

import aiohttp
import pytest
from helpers import hold_active
from scripted_daemon import DaemonParts

from migd.http.app import start_http

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class CDP:
    """Just enough of the Chrome DevTools Protocol: commands with ids, and collected events."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 30)
        if "error" in reply:
            raise AssertionError(f"CDP {method}: {reply['error']}")
        return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        out = []
        for ev in self.events:
            method, params = ev["method"], ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append(params["entry"].get("text", ""))
        return out


@contextlib.asynccontextmanager
async def chromium(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            line = await asyncio.wait_for(proc.stderr.readline(), max(deadline - time.monotonic(), 0.1))
            if not line:
                raise AssertionError("chromium exited before opening its DevTools port")
            m = re.search(rb"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        drain = asyncio.get_running_loop().create_task(proc.stderr.read())  # never let its pipe fill up
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json(content_type=None)
            page = next(t for t in targets if t.get("type") == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = CDP(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await cdp.send(f"{domain}.enable")
                yield cdp
                cdp.reader.cancel()
        drain.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def until(cdp: CDP, expression: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await cdp.evaluate(expression)
        except AssertionError as exc:  # e.g. the page has not replaced about:blank yet
            value, last = None, exc
        else:
            last = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression} ({last}); errors: {cdp.errors()}")
        await asyncio.sleep(0.1)


TOTAL = 1 << 30


def active(remaining: int, sync: int) -> dict[str, Any]:
    return {"status": "active", "setup-time": 1, "total-time": 100, "expected-downtime": 300 - 20 * sync,
            "ram": {"transferred": TOTAL - remaining, "remaining": remaining, "total": TOTAL, "duplicate": 0,
                    "normal": 0, "normal-bytes": 0, "dirty-pages-rate": 1000 * sync, "mbps": 900.0 + sync,
                    "dirty-sync-count": sync, "page-size": 4096}}


async def test_dashboard_charts_a_migration(tmp_path):
    daemon = DaemonParts()
    endpoint = await start_http(daemon, "127.0.0.1", 0, sample_interval=0.1)
    try:
        async with chromium(tmp_path) as cdp:
            await cdp.send("Page.navigate", url=endpoint.url + "/")
            await until(cdp, "document.readyState === 'complete' && document.body.dataset.samples > 0")
            assert await cdp.evaluate("document.getElementById('status').textContent") == "none"
            assert await cdp.evaluate("document.getElementById('connection').dataset.state") == "open"

            # a migration runs: remaining falls, a sync finds re-dirtied pages (pass 2), then pass 3
            daemon.migration.info = {"status": "setup"}
            daemon.events.emit("MIGRATION", {"status": "setup"})
            plan = [(900 << 20, 1), (700 << 20, 1), (500 << 20, 1), (600 << 20, 2), (300 << 20, 2), (100 << 20, 3)]
            points = []
            for remaining, sync in plan:
                daemon.migration.info = active(remaining, sync)
                daemon.events.emit("MIGRATION_PASS", {"pass": sync})
                # each step shows up in the page: the remaining figure and a longer chart
                shown = await until(cdp, f"document.getElementById('pass').textContent === '{sync}' && "
                                    "document.getElementById('chart-remaining').dataset.points")
                points.append(int(shown))
            assert points == sorted(points) and points[-1] > points[0]
            for chart in ("remaining", "bandwidth", "dirty", "downtime"):
                assert int(await cdp.evaluate(
                    f"document.getElementById('chart-{chart}').querySelectorAll('path.series').length")) == 1
            labels = await cdp.evaluate(
                "[...document.querySelectorAll('#chart-remaining text.passlabel')].map(t => t.textContent)")
            assert labels == ["pass 1", "pass 2", "pass 3"]
            percent = await cdp.evaluate("document.getElementById('percent').textContent")
            assert percent.strip() == f"{100 - 100 / 1024 * 100:.1f} %"  # 100 MiB of 1 GiB left; never back
            daemon.migration.info = {**active(0, 4), "status": "completed", "downtime": 48,
                                     "x-migd-downtime-phases": {"pause-vcpus": 1.0, "ram": 30.5}}
            daemon.events.emit("MIGRATION", {"status": "completed"})
            await until(cdp, "document.getElementById('status').dataset.status === 'completed'")
            assert await cdp.evaluate("document.getElementById('percent').textContent") == "100.0 %"
            result = await cdp.evaluate("document.getElementById('result').textContent")
            assert "downtime 48 ms" in result and "ram 30.5 ms" in result
            events = await cdp.evaluate("[...document.querySelectorAll('#events li')].map(li => li.textContent)")
            assert any("MIGRATION" in e and "completed" in e for e in events)
            assert cdp.errors() == []
    finally:
        await endpoint.close()


def test_dashboard_of_a_real_migration(tmp_path, migd_factory):
    """The same page served by a running migd (``--http``) while it really migrates. Synchronous
    test: the harness's legacy QMP client runs its own loop, so the browser part gets asyncio.run and
    calls the harness from a worker thread."""
    from test_http_e2e import http_port

    dst = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = migd_factory("src", "-m", "32M", "--workload", "random,rate=64M,wss=4M", "--http", "127.0.0.1:0")
    port = http_port(src)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.wait_for(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 4 << 20,
                 what="the guest to dirty its working set")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 24 << 20})
    # held at pause-before-switchover until the page has shown it (release_hold would continue at
    # once: here the page must see pre-switchover first)
    hold_active(src)

    async def browse() -> None:
        async with chromium(tmp_path) as cdp:
            await cdp.send("Page.navigate", url=f"http://127.0.0.1:{port}/")
            await until(cdp, "document.getElementById('connection').dataset.state === 'open'")
            await asyncio.to_thread(src.cmd, "migrate", uri=f"unix:{sock}")
            await until(cdp, "['active', 'pre-switchover'].includes(document.getElementById('status').dataset.status)")
            first = int(await cdp.evaluate("document.getElementById('chart-remaining').dataset.points"))
            await until(cdp, f"document.getElementById('chart-remaining').dataset.points > {first}")
            await asyncio.to_thread(src.cmd, "migrate-set-parameters", **{"downtime-limit": 300})
            await asyncio.to_thread(src.wait_for, lambda: src.cmd("query-migrate")["status"] == "pre-switchover",
                                    what="the migration to reach its barrier")
            await until(cdp, "document.getElementById('status').dataset.status === 'pre-switchover'")
            await asyncio.to_thread(src.cmd, "migrate-continue", state="pre-switchover")
            await until(cdp, "document.getElementById('status').dataset.status === 'completed'", timeout=60)
            assert await cdp.evaluate("document.getElementById('percent').textContent") == "100.0 %"
            assert "downtime" in await cdp.evaluate("document.getElementById('result').textContent")
            assert await cdp.evaluate("document.querySelectorAll('#chart-remaining text.passlabel').length") >= 1
            events = await cdp.evaluate("[...document.querySelectorAll('#events li')].map(li => li.textContent)")
            assert any("MIGRATION" in e and "completed" in e for e in events)
            assert cdp.errors() == []

    asyncio.run(browse())


# -- event history, bounded streams, and a headless screenshot --------------------------------------


async def _read_sse(url: str, timeout: float = 30) -> tuple[list[tuple[str, Any]], float]:
    """Every (event, data) of one event stream until the server ends it, and how long that took."""
    start = time.monotonic()
    out: list[tuple[str, Any]] = []
    async with aiohttp.ClientSession() as session, session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        assert r.status == 200
        kind = None
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out, time.monotonic() - start


async def test_event_stream_history_and_bounds(tmp_path):
    """Events from before a page opened come first (those of the last migration); ?once=1 and
    ?duration=S end the stream with an ``end`` event; a bad duration is a 400 naming the parameter."""
    daemon = DaemonParts()
    endpoint = await start_http(daemon, "127.0.0.1", 0, sample_interval=0.1)
    try:
        daemon.events.emit("STOP", {})  # before the migration: not part of its history
        daemon.events.emit("MIGRATION", {"status": "setup"})
        daemon.events.emit("MIGRATION", {"status": "active"})
        daemon.events.emit("MIGRATION_PASS", {"pass": 1})
        daemon.events.emit("SOMETHING_ELSE", {})  # not forwarded, not kept
        got, took = await _read_sse(endpoint.url + "/api/v1/events?once=1")
        kinds = [k for k, _ in got]
        assert kinds == ["history", "events", "end"] and took < 10
        assert [(e["event"], e.get("data")) for e in got[1][1]] == [
            ("MIGRATION", {"status": "setup"}), ("MIGRATION", {"status": "active"}),
            ("MIGRATION_PASS", {"pass": 1})]
        assert got[0][1] and got[0][1][-1]["downtime_limit"] == 300  # the parameter's default
        got, took = await _read_sse(endpoint.url + "/api/v1/events?duration=1.5")
        kinds = [k for k, _ in got]
        assert kinds[:2] == ["history", "events"] and kinds[-1] == "end" and "sample" in kinds
        assert 1.4 <= took < 10
        async with aiohttp.ClientSession() as session:
            for bad in ("-1", "abc", "nan", "1e9"):
                async with session.get(endpoint.url + f"/api/v1/events?duration={bad}") as r:
                    assert r.status == 400 and "'duration'" in await r.text()
    finally:
        await endpoint.close()


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows of an 8-bit RGB/RGBA PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for r in range(height):
        f, line = raw[r * (stride + 1)], bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, rows


HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--window-size=1200,900", "--virtual-time-budget=5000"]


def test_headless_screenshot_of_a_migration(tmp_path, migd_factory):
    """``chromium --headless --virtual-time-budget --screenshot`` of ``/?once=1`` during a real
    migration returns (the event stream ends), and the picture and the DOM show the migration: its
    status in the title and badge, the events from before the page opened, the downtime limit on a
    log-scale chart and the convergence state."""
    dst = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    src = migd_factory("src", "-m", "32M", "--workload", "random,rate=64M,wss=4M", "--http", "127.0.0.1:0")
    from test_http_e2e import http_port
    port = http_port(src)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.wait_for(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 8 << 20,
                 what="the guest to dirty its working set")
    # never converges (see test_pass_logging): the migration is active for as long as the test needs
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 24 << 20, "downtime-limit": 1})
    src.cmd("migrate", uri=f"unix:{sock}")
    try:
        src.wait_for(lambda: "x-migd-convergence" in src.cmd("query-migrate")
                     and src.cmd("query-migrate")["total-time"] > 2500, what="a forecast and a few samples")
        shot = tmp_path / "dashboard.png"
        url = f"http://127.0.0.1:{port}/?once=1"
        start = time.monotonic()
        done = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'p1'}", f"--screenshot={shot}",
                               url], capture_output=True, timeout=120)
        took = time.monotonic() - start
        assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
        dom = subprocess.run([CHROMIUM, *HEADLESS, f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", url],
                             capture_output=True, timeout=120, text=True)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert src.cmd("query-migrate")["status"] == "active"  # still migrating after both
    finally:
        src.cmd("migrate_cancel")
    html = dom.stdout
    assert re.search(r"<title>migd · active \d+\.\d %</title>", html), html[:500]
    assert 'id="status" class="badge" data-status="active"' in html
    assert 'data-ended="1"' in html and 'data-state="closed"' in html  # the stream ended, no reconnect
    assert re.search(r'id="convergence" data-state="(converging|stalled|diverging)"', html)
    assert 'id="limit">1 ms<' in html
    assert 'class="limit"' in html and 'data-scale="log"' in html
    events = re.findall(r"<li>([^<]*)</li>", html)
    assert any("MIGRATION" in e and '"setup"' in e for e in events), events  # from before the page
    width, height, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    bpp = len(rows[0]) // width
    sampled = [row[i:i + 3] for row in rows[::4] for i in range(0, len(row), bpp * 4)]
    counts = collections.Counter(sampled)
    background, _ = counts.most_common(1)[0]
    inked = len(sampled) - counts[background]
    assert len(counts) > 20 and inked > len(sampled) // 20, (len(counts), inked, len(sampled))
    # the chart line (the accent blue #2f6fde) is drawn
    assert any(b"\x2f\x6f\xde" in row for row in rows), "no chart series in the screenshot"
    print(f"screenshot {shot} in {took:.1f} s: {len(counts)} colours, {inked} of {len(sampled)} samples inked")


async def test_dashboard_shows_convergence_limit_and_a_late_pages_history(tmp_path):
    """A page opened after the migration's first events lists them; the convergence state and ETA,
    the downtime limit (as set) and its line on the log-scale chart show; the title says the state."""
    daemon = DaemonParts()
    daemon.migration_config.set_parameters({"downtime-limit": 50})
    endpoint = await start_http(daemon, "127.0.0.1", 0, sample_interval=0.1)
    try:
        daemon.events.emit("MIGRATION", {"status": "setup"})
        daemon.migration.info = {**active(400 << 20, 2), "expected-downtime": 20000,
                                 "x-migd-convergence": {"state": "converging", "eta-ms": 3200}}
        daemon.events.emit("MIGRATION", {"status": "active"})
        async with chromium(tmp_path) as cdp:
            await cdp.send("Page.navigate", url=endpoint.url + "/")
            await until(cdp, "document.getElementById('convergence').dataset.state === 'converging'")
            assert await cdp.evaluate("document.getElementById('convergence').textContent") == \
                "converging · eta 3200 ms"
            assert await cdp.evaluate("document.getElementById('limit').textContent") == "50 ms"
            assert await cdp.evaluate("document.title") == "migd · active 60.9 %"
            events = await cdp.evaluate("[...document.querySelectorAll('#events li')].map(li => li.textContent)")
            assert any('"setup"' in e for e in events) and any('"active"' in e for e in events)
            chart = "document.getElementById('chart-downtime')"
            assert await cdp.evaluate(f"{chart}.dataset.scale") == "log"
            assert await cdp.evaluate(f"{chart}.querySelector('text.limitlabel').textContent") == "limit 50 ms"
            # log scale: 50 ms sits well up the chart although the estimate is 400 times larger
            y_limit = float(await cdp.evaluate(f"{chart}.querySelector('line.limit').getAttribute('y1')"))
            assert 30 < y_limit < 130  # the chart's plot area runs from y=14 (top) to y=152 (bottom)
            daemon.migration.info = {**active(400 << 20, 3), "x-migd-convergence": {"state": "diverging"}}
            await until(cdp, "document.getElementById('convergence').dataset.state === 'diverging'")
            assert await cdp.evaluate("document.getElementById('convergence').textContent") == "diverging"
            assert cdp.errors() == []
    finally:
        await endpoint.close()
