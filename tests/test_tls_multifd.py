"""TLS on multifd channels between real daemons: every channel does its own handshake (QEMU's rule).

A relay between source and destination records what each connection's first bytes are (a TLS
handshake record, 0x16 0x03, on the main channel and on every multifd channel) and can sabotage one
multifd connection: it answers the source with bytes that are not TLS and hands the destination the
same garbage. Then the source's migration fails in its setup with the handshake's reason, its guest
running and no channel thread left; the destination drops the bad connection (logged) and fails once
the source closes its connections. zero-copy-send stays refused with TLS (QEMU's text).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2e_util import digests, poll, run_status, wait_status  # noqa: E402
from helpers import Migd, thread_names, wait_for  # noqa: E402
from relay import Relay  # noqa: E402
from tls_certs import client_dir, make_ca, server_dir  # noqa: E402

MEM = "32M"


def _x509(obj_id: str, directory: Path, endpoint: str) -> dict[str, Any]:
    return {"qom-type": "tls-creds-x509", "id": obj_id, "endpoint": endpoint, "dir": str(directory),
            "sanity-check": True, "verify-peer": True}


def _multifd(vm: Migd, channels: int) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})


def _pair(factory: Any, tmp_path: Path, channels: int) -> tuple[Migd, Migd, int]:
    """A TLS source and a TLS destination (-S, so its RAM holds still) listening on tcp; its port."""
    ca = make_ca()
    dst = factory("dst", "-m", MEM, "-S", "--incoming", "defer")
    assert dst.cmd_raw("object-add", _x509("tls0", server_dir(tmp_path / "srv", ca), "server")) == {"return": {}}
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    _multifd(dst, channels)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = int(dst.cmd("query-migrate")["socket-address"][0]["port"])
    src = factory("src", "-m", MEM, "--workload", "random,rate=16M")
    assert src.cmd_raw("object-add", _x509("tls0", client_dir(tmp_path / "cli", ca), "client")) == {"return": {}}
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "max-bandwidth": 0})
    _multifd(src, channels)
    return src, dst, port


@pytest.mark.parametrize("channels", [2])
def test_multifd_over_tls_completes_with_equal_digests(migd_factory: Any, tmp_path: Path, channels: int) -> None:
    src, dst, port = _pair(migd_factory, tmp_path, channels)
    relay = Relay.tcp(port)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        info = wait_status(src, "completed", 60)
        wait_status(dst, "completed", 60)
        assert digests(dst) == digests(src)
        assert info["ram"]["normal"] > 0
        # the main channel and every multifd channel began with a TLS handshake record
        assert sorted(relay.first) == list(range(channels + 1))
        assert all(first == b"\x16\x03" for first in relay.first.values()), relay.first
        assert "TLS connection refused" not in dst.log()
        wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="source channel threads gone")
        wait_for(lambda: not thread_names(dst, "mig/dst/mfd"), timeout=10, what="destination channel threads gone")
    finally:
        relay.close()


def test_multifd_channel_whose_handshake_fails_fails_the_migration_cleanly(migd_factory: Any,
                                                                           tmp_path: Path) -> None:
    src, dst, port = _pair(migd_factory, tmp_path, 2)
    relay = Relay.tcp(port, sabotage=2)  # the second multifd channel
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        info = wait_status(src, "failed", 60)
        desc = str(info.get("error-desc"))
        assert desc.startswith("multifd: TLS handshake failed"), desc
        assert run_status(src) == "running"
        assert "ram" not in info  # it failed in setup, before any page went out
        wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="source channel threads gone")
        # the source closed its connections: the destination fails (and, started with -incoming, exits 1),
        # whether its acceptor was still refusing the garbage (logged) or a channel saw the end first
        assert dst.wait(timeout=30) == 1
        assert "load of migration failed" in dst.log()
    finally:
        relay.close()


def test_zero_copy_send_stays_refused_with_tls(migd_factory: Any, tmp_path: Path) -> None:
    src = migd_factory("src", "-m", "16M")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    _multifd(src, 2)
    reply = src.cmd_raw("migrate-set-capabilities",
                        {"capabilities": [{"capability": "zero-copy-send", "state": True}]})
    if "error" in reply:  # as QEMU: the capability itself is refused while tls-creds is set
        assert reply["error"]["desc"] == "Zero copy only available for non-compressed non-TLS multifd migration"
    else:  # migd with it: migrate refuses it with TLS, in QEMU's words
        err = src.cmd_error("migrate", uri="tcp:127.0.0.1:1")
        assert err["desc"] == "Zero copy only available for non-compressed non-TLS multifd migration"
    assert src.cmd("query-migrate") == {}
    assert run_status(src) == "running"


def test_cancel_ends_a_multifd_channel_handshake_that_hears_nothing(migd_factory: Any, tmp_path: Path) -> None:
    """The second multifd channel connects but its peer never answers the handshake: migrate_cancel
    wakes it (it does not wait for the handshake's own time-out) and the guest runs on."""
    src, dst, port = _pair(migd_factory, tmp_path, 2)
    relay = Relay.tcp(port, sabotage=2, silent=True)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
        wait_for(lambda: len(relay.socks) == 5, timeout=30, what="main + channel 0 relayed, channel 1 held")
        assert src.cmd("query-migrate")["status"] == "setup"
        src.cmd("migrate_cancel")
        wait_status(src, "cancelled", 30)
        assert run_status(src) == "running"
        wait_for(lambda: not thread_names(src, "mig/src/"), timeout=30, what="migration thread gone")
        # woken by the cancel, not ended by the handshake's own time-out
        poll(lambda: "multifd channel 1: TLS handshake failed: cancelled" in src.log(), 10, "the wake logged")
        assert "timed out" not in src.log()
    finally:
        relay.close()
