"""The aiohttp application: ``/metrics``, ``/healthz``, ``/api/v1/migration``, ``/api/v1/events`` and ``/``.

It runs on the daemon's event loop next to QMP and only reads what QMP reads (published counters), so
a scrape or an open dashboard can never slow the migration; it listens on loopback unless told otherwise,
and answers only for its own Host names (migd.http.hosts).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from migd.http.host import HttpHost
from migd.http.hosts import HostCheck, host_middleware
from migd.http.live import LiveFeed
from migd.http.metrics import CONTENT_TYPE, api_info, make_registry, migration_info, render
from migd.machine.runstate import RunState

log = logging.getLogger(__name__)

HEARTBEAT = 15.0  # seconds between SSE comments, so proxies and browsers keep the stream open
MAX_DURATION = 86400.0  # the largest ?duration= an event stream may ask for, seconds
UNHEALTHY_RUNSTATES = frozenset({RunState.INTERNAL_ERROR, RunState.IO_ERROR, RunState.GUEST_PANICKED})
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

DAEMON_KEY = web.AppKey[HttpHost]("daemon")
FEED_KEY = web.AppKey("feed", LiveFeed)
REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


@dataclass
class HttpEndpoint:
    """A running endpoint; ``port`` is the real one when 0 was asked for."""

    runner: web.AppRunner
    feed: LiveFeed
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self.feed.close()  # ends every open event stream first, so cleanup does not wait on them
        await self.runner.cleanup()


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value), status=status, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    """200 while the loop answers and the guest is not in an error run state; 503 otherwise."""
    daemon = request.app[DAEMON_KEY]
    state = daemon.runstate.state
    info = migration_info(daemon)
    healthy = state not in UNHEALTHY_RUNSTATES
    body = {"status": "ok" if healthy else "error", "runstate": str(state),
            "migration": info.get("status", "none")}
    return _json(body, 200 if healthy else 503)


async def migration(request: web.Request) -> web.Response:
    return _json(api_info(request.app[DAEMON_KEY]))


def _sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _stream_limit(query: Mapping[str, str]) -> float | None:
    """Seconds an event stream may last: ``?once=1`` 0 (the history only), ``?duration=S`` S, else
    unbounded. A bad value is a 400 naming the parameter."""
    if query.get("once", "") not in ("", "0"):
        return 0.0
    raw = query.get("duration")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds <= MAX_DURATION:  # also refuses nan
        raise web.HTTPBadRequest(text=f"Parameter 'duration' expects seconds between 0 and {MAX_DURATION:g}")
    return seconds


async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the sample history and the last migration's QMP events first, then each new
    sample and forwarded QMP event. With ``?once=1`` or ``?duration=S`` the stream ends (after an
    ``end`` event, so the page closes it instead of reconnecting): a headless browser can finish."""
    feed = request.app[FEED_KEY]
    limit = _stream_limit(request.query)
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    queue = feed.subscribe()
    try:
        await response.write(b"retry: 1000\n\n" + _sse("history", list(feed.history))
                             + _sse("events", list(feed.events)))
        while True:
            wait = HEARTBEAT if deadline is None else min(HEARTBEAT, deadline - loop.time())
            if wait <= 0:
                await response.write(_sse("end", {"reason": "duration"}))
                break
            try:
                item = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if not feed.subscribed(queue):
                    break
                if deadline is None or loop.time() < deadline:
                    await response.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            await response.write(_sse(*item))
    except (ConnectionResetError, asyncio.CancelledError):
        pass  # the page went away (or the server is closing): nothing to clean but our queue
    finally:
        feed.unsubscribe(queue)
    return response


def _static(name: str) -> tuple[bytes, str] | None:
    if "/" in name or name.startswith("."):
        return None
    path = resources.files("migd.http").joinpath("static", name)
    if not path.is_file():
        return None
    suffix = name[name.rfind("."):]
    return path.read_bytes(), STATIC_TYPES.get(suffix, "application/octet-stream")


async def static(request: web.Request) -> web.Response:
    found = _static(request.match_info.get("name", "index.html"))
    if found is None:
        raise web.HTTPNotFound()
    body, ctype = found
    return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "no-cache"})


def make_app(daemon: HttpHost, feed: LiveFeed, hosts: HostCheck | None = None) -> web.Application:
    """The routes; with ``hosts``, a request for a Host name that is not ours gets 421."""
    app = web.Application(middlewares=[host_middleware(hosts)] if hosts is not None else [])
    app[DAEMON_KEY] = daemon
    app[FEED_KEY] = feed
    app[REGISTRY_KEY] = make_registry(daemon)
    app.router.add_get("/", static)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/migration", migration)
    app.router.add_get("/api/v1/events", events)
    return app


async def start_http(daemon: HttpHost, host: str = "127.0.0.1", port: int = 0, *,
                     sample_interval: float = 1.0) -> HttpEndpoint:
    """Serve the endpoint on the running loop; raises OSError if the address is taken."""
    feed = LiveFeed(daemon, sample_interval)
    hosts = HostCheck()
    runner = web.AppRunner(make_app(daemon, feed, hosts), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    feed.start()
    real_port = runner.addresses[0][1] if runner.addresses else port
    hosts.configure(host, real_port)
    log.info("http endpoint on http://%s:%d/", host, real_port)
    return HttpEndpoint(runner, feed, host, real_port)
