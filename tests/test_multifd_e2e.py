"""multifd between real daemons: 2 and 4 channels over unix and tcp, with and without compression, land
with equal RAM digests; cancel, a destination killed mid-way and a refused transport leave the source
running with a clear error and no channel thread behind."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest
from helpers import HELD, Migd, hold_active, release_hold, settled, thread_names, wait_for
from relay import Relay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _setup(vm: Migd, channels: int, compression: str = "none", **extra: Any) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression,
                                         **extra})


BOUNDED = "random,rate=16M,wss=4M"  # what a final pass carries at most: the working set


def _pair(migd_factory: Any, uri_for: Any, workload: str = BOUNDED) -> tuple[Migd, Migd, str]:
    src = migd_factory("src", "-m", "64M", "--workload", workload)
    uri = uri_for(src)
    dst = migd_factory("dst", "-m", "64M", "-S", "--incoming", uri)  # -S: its RAM holds still
    return src, dst, uri


def _unix(vm: Migd) -> str:
    return f"unix:{vm.sock_path('mig')}"


def _tcp(_vm: Migd) -> str:
    return f"tcp:127.0.0.1:{_free_port()}"


def _migrate_and_check(src: Migd, dst: Migd, uri: str) -> dict[str, Any]:
    """Migrate a guest with a bounded working set and wait for the end. A 2 s downtime limit fits the
    whole set in the final pass at 2 MB/s already: zlib on a loaded host sends random pages at ~10 MB/s,
    below the guest's 16 MB/s, so an unbounded guest with the default 300 ms never converged."""
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 2000})
    src.cmd("migrate", uri=uri)
    info = src.wait_for(lambda: (lambda i: i if i["status"] in ("completed", "failed") else None)(
        src.cmd("query-migrate")), timeout=120, what="migration end")
    assert info["status"] == "completed", info
    wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", timeout=30, what="landed")
    assert src.cmd("x-migd-ram-digest") == dst.cmd("x-migd-ram-digest")
    assert info["ram"]["normal"] > 0
    wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="source channel threads gone")
    wait_for(lambda: not thread_names(dst, "mig/dst/mfd"), timeout=10, what="destination channel threads gone")
    return info


@pytest.mark.parametrize("channels,uri_for,compression", [
    (2, _unix, "none"), (4, _unix, "none"), (2, _tcp, "none"), (4, _tcp, "zstd"), (2, _unix, "zlib"),
])
def test_multifd_completes_with_equal_digests(migd_factory: Any, channels: int, uri_for: Any,
                                              compression: str) -> None:
    src, dst, uri = _pair(migd_factory, uri_for)
    for vm in (src, dst):
        _setup(vm, channels, compression, **{"multifd-zstd-level": 3, "multifd-zlib-level": 2})
    info = _migrate_and_check(src, dst, uri)
    if compression == "none":  # every normal page went out whole
        assert info["ram"]["transferred"] >= info["ram"]["normal-bytes"], info["ram"]


def test_multifd_compressible_guest_sends_fewer_bytes(migd_factory: Any) -> None:
    src, dst, uri = _pair(migd_factory, _unix, workload="random,rate=64M,wss=16M,compress=0.75")
    for vm in (src, dst):
        _setup(vm, 2, "zstd")
    info = _migrate_and_check(src, dst, uri)
    # pages written by the guest are 3/4 zeros inside: zstd sends well under their raw size
    assert info["ram"]["transferred"] < info["ram"]["normal-bytes"] * 0.6, info["ram"]


@pytest.mark.parametrize("channels", [2, 4])
def test_multifd_cancel_midway_leaves_the_guest_running(migd_factory: Any, channels: int) -> None:
    src, dst, uri = _pair(migd_factory, _unix, workload="random,rate=64M")
    for vm in (src, dst):
        _setup(vm, channels)
    hold_active(src)
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.cmd("query-migrate")["status"] in HELD, timeout=30, what="active")
    wait_for(lambda: len(thread_names(src, "mig/src/mfd")) == channels, timeout=10, what="every sender thread")
    src.cmd("migrate_cancel")
    wait_for(lambda: src.cmd("query-migrate")["status"] == "cancelled", timeout=30, what="cancelled")
    settled(src, "running")  # held, it may have been cancelled in pre-switchover, vCPUs stopped
    wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="sender threads gone")
    assert dst.wait(timeout=30) == 1  # the destination failed its load and exited (exit-on-error)


@pytest.mark.parametrize("channels", [2, 4])
def test_multifd_destination_killed_midway_fails_the_source(migd_factory: Any, channels: int) -> None:
    src, dst, uri = _pair(migd_factory, _tcp, workload="random,rate=64M")
    for vm in (src, dst):
        _setup(vm, channels)
    hold_active(src)
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.cmd("query-migrate")["status"] in HELD, timeout=30, what="active")
    wait_for(lambda: src.cmd("query-migrate")["ram"]["normal"] > 100, timeout=30, what="pages flowing")
    os.kill(dst.proc.pid, signal.SIGKILL)
    info = src.wait_for(lambda: (lambda i: i if i["status"] == "failed" else None)(src.cmd("query-migrate")),
                        timeout=60, what="failed")
    assert info.get("error-desc"), info
    settled(src, "running")
    wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="sender threads gone")


def test_multifd_one_channel_closed_by_the_peer_fails_both_sides(migd_factory: Any) -> None:
    """A relay in front of the destination cuts one multifd connection (not the main one)."""
    src, dst, uri = _pair(migd_factory, _unix, workload="random,rate=64M")
    for vm in (src, dst):
        _setup(vm, 2)
    relay = Relay.unix(str(src.sock_path("relay")), uri.removeprefix("unix:"), limit=3)  # main + 2 channels
    try:
        hold_active(src)
        src.cmd("migrate", uri=f"unix:{relay.server.getsockname()}")
        wait_for(lambda: len(relay.socks) == 6, timeout=30, what="three relayed connections")
        wait_for(lambda: src.cmd("query-migrate").get("ram", {}).get("normal", 0) > 100, timeout=30,
                 what="pages flowing (status still active)")
        relay.socks[5].shutdown(socket.SHUT_RDWR)  # the destination's end of the last multifd channel
        info = src.wait_for(lambda: (lambda i: i if i["status"] == "failed" else None)(
            src.cmd("query-migrate")), timeout=60, what="failed")
        assert info.get("error-desc"), info
        settled(src, "running")
        wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="sender threads gone")
        assert dst.wait(timeout=30) == 1
        assert "multifd" in dst.log()
    finally:
        relay.close()


def test_multifd_refused_on_exec_and_file_and_unsupported_compression(migd_factory: Any, tmp_path: Any) -> None:
    src = migd_factory("src", "-m", "16M")
    _setup(src, 2)
    for uri in ("exec:cat > /dev/null", f"file:{tmp_path}/out"):
        err = src.cmd_error("migrate", uri=uri)
        assert err["desc"] == "Migration requires multi-channel URIs (e.g. tcp)"
    assert src.cmd("query-migrate") == {}
    err = src.cmd_error("migrate-set-parameters", **{"multifd-compression": "qpl"})
    assert err["desc"] == "multifd-compression 'qpl' is not supported by migd (use none, zlib or zstd)"
    assert src.cmd("query-migrate-parameters")["multifd-compression"] == "none"
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})  # multifd with TLS: tcp only, as one channel
    err = src.cmd_error("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    assert err["desc"] == "TLS is only supported on tcp migration channels by migd"
    assert src.cmd("query-migrate") == {}
    assert src.cmd("query-status")["status"] == "running"


def test_multifd_follows_a_block_hot_plugged_mid_way(migd_factory: Any) -> None:
    """The main channel announces the block; channel packets naming it wait until it exists."""
    src, dst, uri = _pair(migd_factory, _unix, workload="random,rate=32M")
    for vm in (src, dst):
        _setup(vm, 2)
    hold_active(src)
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.cmd("query-migrate").get("ram", {}).get("normal", 0) > 100, timeout=30,
             what="pages flowing")
    assert "return" in src.cmd_raw("x-migd-ram-add", {"name": "hot0", "size": 8 << 20})
    assert src.cmd("query-migrate")["status"] in HELD  # the block really came mid-way
    release_hold(src)
    info = src.wait_for(lambda: (lambda i: i if i["status"] in ("completed", "failed") else None)(
        src.cmd("query-migrate")), timeout=120, what="migration end")
    assert info["status"] == "completed", info
    wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", timeout=30, what="landed")
    digest = src.cmd("x-migd-ram-digest")
    assert [b["name"] for b in digest["blocks"]] == ["ram0", "hot0"]
    assert digest == dst.cmd("x-migd-ram-digest")


def test_multifd_channel_counts_that_differ_fail_at_once(migd_factory: Any) -> None:
    src, dst, uri = _pair(migd_factory, _unix, workload="idle")
    _setup(src, 2)
    _setup(dst, 4)
    src.cmd("migrate", uri=uri)
    info = src.wait_for(lambda: (lambda i: i if i["status"] == "failed" else None)(src.cmd("query-migrate")),
                        timeout=30, what="failed")
    assert info.get("error-desc"), info
    assert dst.wait(timeout=30) == 1
    assert "the source opens 2 channels and this destination expects 4" in dst.log()
    assert src.cmd("query-status")["status"] == "running"
