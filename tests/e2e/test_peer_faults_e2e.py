"""End to end: a stopped peer is noticed (heartbeats, x-migd-peer-timeout), with real daemons over tcp.

SIGSTOP freezes one daemon mid-migration: the other must give up within the configured timeout, the
guest must run on exactly one side (the source, since nothing was committed), and a new migration
must then work.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from e2e_util import poll, query, run_status, wait_status

pytestmark = pytest.mark.e2e

MB = 1 << 20
PEER_TIMEOUT = 2  # seconds, on the side that must notice
SLACK = 4.0  # seconds of scheduling noise allowed on this shared 2-core machine


def tcp_uri(dst: Any) -> str:
    return f"tcp:127.0.0.1:{query(dst)['socket-address'][0]['port']}"


def start_slow_migration(src: Any, dst: Any) -> None:
    # a 1 ms downtime limit keeps it in `active`: the policy would switch a capped 128 MiB guest over
    # within a second (its final pass runs uncapped)
    src.cmd("migrate-set-parameters", **{"downtime-limit": 1})
    src.cmd("migrate", uri=tcp_uri(dst))
    wait_status(src, "active", 30)
    poll(lambda: query(src).get("ram", {}).get("transferred", 0) > 2 * MB, 60, "data to flow")


def test_stopped_destination_fails_the_source_in_time_guest_runs_then_migrates(migd_factory: Callable[..., Any]) -> None:
    src = migd_factory("src", "-m", "128M", "--workload", "random,rate=8M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MB, "x-migd-peer-timeout": PEER_TIMEOUT})
    dst = migd_factory("dst", "-m", "128M", "--incoming", "tcp:127.0.0.1:0")
    start_slow_migration(src, dst)
    info = poll(lambda: (q := query(src)) and "x-migd-peer-silent-ms" in q and q, 10, "x-migd-peer-silent-ms")
    assert 0 <= info["x-migd-peer-silent-ms"] < 1500, info
    os.kill(dst.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        silent = poll(lambda: (q := query(src)).get("x-migd-peer-silent-ms", 0) >= 1000 and q, 10,
                      "query-migrate to show the growing silence")
        assert silent["status"] == "active"
        info = wait_status(src, "failed", PEER_TIMEOUT + SLACK + 5)
        elapsed = time.monotonic() - t0
        print(f"stopped destination noticed by the source after {elapsed:.2f} s (timeout {PEER_TIMEOUT} s)")
        assert PEER_TIMEOUT - 0.5 <= elapsed <= PEER_TIMEOUT + SLACK, elapsed
        assert "The destination has been silent for" in info["error-desc"], info
        assert run_status(src) == "running"
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)
    dst.kill()
    # the guest runs, and a new migration to a healthy destination works
    dst2 = migd_factory("dst2", "-m", "128M", "--incoming", "tcp:127.0.0.1:0")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 300})
    src.cmd("migrate", uri=tcp_uri(dst2))
    wait_status(src, "completed", 90)
    wait_status(dst2, "completed", 30)
    assert run_status(dst2) == "running" and run_status(src) == "postmigrate"


def test_stopped_source_fails_the_destination_in_time_not_running(migd_factory: Callable[..., Any]) -> None:
    src = migd_factory("src", "-m", "128M", "--workload", "random,rate=8M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 * MB})
    dst = migd_factory("dst", "-m", "128M", "--incoming", "defer")
    dst.cmd("migrate-set-parameters", **{"x-migd-peer-timeout": PEER_TIMEOUT})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    start_slow_migration(src, dst)
    poll(lambda: "x-migd-peer-silent-ms" in query(dst), 10, "the destination to watch the source")
    os.kill(src.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        info = wait_status(dst, "failed", PEER_TIMEOUT + SLACK + 5)
        elapsed = time.monotonic() - t0
        print(f"stopped source noticed by the destination after {elapsed:.2f} s (timeout {PEER_TIMEOUT} s)")
        assert PEER_TIMEOUT - 0.5 <= elapsed <= PEER_TIMEOUT + SLACK, elapsed
        assert info["error-desc"].startswith("The source has been silent for"), info
        status = dst.cmd("query-status")
        assert status["status"] == "inmigrate" and status["running"] is False
    finally:
        os.kill(src.proc.pid, signal.SIGCONT)
    # the source wakes up to a destination that gave up: it fails and keeps its guest
    info = wait_status(src, "failed", 30)
    assert run_status(src) == "running", info
