"""The HTTP endpoint answers only for its own Host names (DNS rebinding gets 421), over real sockets."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from scripted_daemon import DaemonParts

from migd.http.app import start_http
from migd.http.hosts import HostCheck


@pytest.fixture
async def endpoint():
    ep = await start_http(DaemonParts(), "127.0.0.1", 0, sample_interval=0.2)
    async with aiohttp.ClientSession(base_url=ep.url) as session:
        yield ep, session
    await ep.close()


async def status(session: aiohttp.ClientSession, path: str, host: str | None) -> int:
    headers = {"Host": host} if host is not None else {}
    async with session.get(path, headers=headers) as reply:
        await reply.read()
        return reply.status


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/api/v1/migration", "/"])
async def test_forged_host_is_refused(endpoint, path: str) -> None:
    ep, session = endpoint
    for forged in (f"evil.example:{ep.port}", "evil.example", f"localhost.evil.example:{ep.port}",
                   f"127.0.0.1:{ep.port + 1}", f"localhost:{ep.port}x", f"[::2]:{ep.port}"):
        assert await status(session, path, forged) == 421, forged


async def test_own_names_are_served(endpoint) -> None:
    ep, session = endpoint
    for own in (None, f"127.0.0.1:{ep.port}", f"localhost:{ep.port}", f"LOCALHOST:{ep.port}",
                f"[::1]:{ep.port}", f"localhost.:{ep.port}"):
        assert await status(session, "/healthz", own) == 200, own


async def test_event_stream_refused_for_a_forged_host(endpoint) -> None:
    ep, session = endpoint
    async with session.get("/api/v1/events", headers={"Host": f"rebind.example:{ep.port}"}) as reply:
        assert reply.status == 421


async def test_wildcard_bind_serves_ip_literals_and_the_host_name() -> None:
    ep = await start_http(DaemonParts(), "0.0.0.0", 0, sample_interval=0.2)
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{ep.port}") as session:
            assert await status(session, "/healthz", f"192.0.2.7:{ep.port}") == 200
            assert await status(session, "/healthz", f"{socket.gethostname()}:{ep.port}") == 200
            assert await status(session, "/healthz", f"evil.example:{ep.port}") == 421
    finally:
        await ep.close()


def test_port_80_may_be_left_out() -> None:
    check = HostCheck()
    check.configure("127.0.0.1", 80)
    assert check.allows("localhost") and check.allows("127.0.0.1:80") and not check.allows("evil")
