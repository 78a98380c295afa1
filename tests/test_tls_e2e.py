"""TLS migrations between real daemons: QEMU's qtest TLS cases as the checklist.

QEMU's cases (tests/qtest/migration/tls-tests.c) and what migd does, with the certificates made here:
x509 default host (match) and override host complete with equal RAM; mismatched host, hostile client
(another CA), a client whose DN ``tls-authz`` does not allow, and an anonymous client with
``verify-peer=on`` fail on the source, which keeps running its guest; the destination drops the refused
connection and keeps listening, as QEMU's does (shown by a good migration afterwards). A plain source
cannot talk to a TLS destination. Plus the refusals: TLS on a non-tcp channel, credentials that do
not exist or are for the wrong endpoint, and the objects from the command line and a TOML file.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2e_util import digests, poll, run_status, wait_status  # noqa: E402
from tls_certs import CLIENT_NAME, HOSTILE_NAME, client_dir, make_ca, server_dir  # noqa: E402

MEM = "32M"


def _x509(obj_id: str, directory: Path, endpoint: str, verify_peer: bool = True) -> dict[str, Any]:
    return {"qom-type": "tls-creds-x509", "id": obj_id, "endpoint": endpoint, "dir": str(directory),
            "sanity-check": True, "verify-peer": verify_peer}


def _source(factory: Callable[..., Any], creds: Path | None, hostname: str | None = None) -> Any:
    src = factory("src", "-m", MEM)
    if creds is not None:
        assert src.cmd_raw("object-add", _x509("tlscredsx509client0", creds, "client")) == {"return": {}}
        src.cmd("migrate-set-parameters", **{"tls-creds": "tlscredsx509client0"})
    if hostname is not None:
        src.cmd("migrate-set-parameters", **{"tls-hostname": hostname})
    return src


def _destination(factory: Callable[..., Any], creds: Path, verify_peer: bool = True,
                 authz: str | None = None) -> tuple[Any, str]:
    """A destination with server credentials (QMP object-add, as QEMU's test), listening on tcp."""
    dst = factory("dst", "-m", MEM, "--incoming", "defer")
    assert dst.cmd_raw("object-add", _x509("tlscredsx509server0", creds, "server", verify_peer)) == {"return": {}}
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tlscredsx509server0"})
    if authz is not None:
        reply = dst.cmd_raw("object-add", {"qom-type": "authz-simple", "id": "tlsauthz0", "identity": authz})
        assert reply == {"return": {}}
        dst.cmd("migrate-set-parameters", **{"tls-authz": "tlsauthz0"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    return dst, f"tcp:127.0.0.1:{port}"


def _completes(src: Any, dst: Any, uri: str) -> None:
    src.cmd("migrate", uri=uri)
    wait_status(src, "completed", 60)
    wait_status(dst, "completed", 60)
    assert digests(dst) == digests(src)
    assert run_status(dst) == "running"


def _refused(src: Any, dst: Any, uri: str, dst_reason: str | None) -> str:
    """The source fails and runs its guest on; the destination logs the refusal and still listens."""
    src.cmd("migrate", uri=uri)
    info = wait_status(src, "failed", 30)
    assert run_status(src) == "running"
    if dst_reason is not None:
        poll(lambda: dst_reason in dst.log(), 10, f"the destination's log: {dst_reason}")
    assert dst.cmd("query-migrate")["status"] == "setup"
    assert run_status(dst) == "inmigrate"
    return str(info["error-desc"])


@pytest.fixture
def ca() -> Any:
    return make_ca()


def test_x509_default_host_completes(migd_factory, tmp_path: Path, ca: Any) -> None:
    """Mutual authentication, the server checked against the URI's host (127.0.0.1)."""
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca))
    src = _source(migd_factory, client_dir(tmp_path / "cli", ca))
    _completes(src, dst, uri)
    assert "TLS connection refused" not in dst.log()


def test_x509_override_host_completes(migd_factory, tmp_path: Path, ca: Any) -> None:
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca, hosts=("qemu.org",)))
    src = _source(migd_factory, client_dir(tmp_path / "cli", ca), hostname="qemu.org")
    _completes(src, dst, uri)


def test_x509_mismatch_host_fails_cleanly_then_works(migd_factory, tmp_path: Path, ca: Any) -> None:
    """A server certificate for 10.0.0.1 reached as 127.0.0.1: the source refuses the server; the
    destination sees the handshake fail and keeps listening; naming the host then works."""
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca, hosts=("10.0.0.1",)))
    src = _source(migd_factory, client_dir(tmp_path / "cli", ca))
    desc = _refused(src, dst, uri, "TLS connection refused: TLS handshake failed")
    assert desc == "Certificate does not match the hostname 127.0.0.1"
    src.cmd("migrate-set-parameters", **{"tls-hostname": "10.0.0.1"})
    _completes(src, dst, uri)


def test_x509_hostile_client_of_another_ca_is_refused(migd_factory, tmp_path: Path, ca: Any) -> None:
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca))
    hostile = client_dir(tmp_path / "hostile", ca, signer=make_ca("another CA"))
    src = _source(migd_factory, hostile)
    _refused(src, dst, uri, "TLS connection refused: The certificate hasn't got a known issuer")
    # the same destination still takes a client of its own CA
    src.cmd("object-del", id="tlscredsx509client0")
    src.cmd_raw("object-add", _x509("tlscredsx509client0", client_dir(tmp_path / "cli", ca), "client"))
    _completes(src, dst, uri)


def test_x509_anonymous_client_refused_with_verify_peer(migd_factory, tmp_path: Path, ca: Any) -> None:
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca))
    src = _source(migd_factory, client_dir(tmp_path / "anon", ca, cn=None))
    _refused(src, dst, uri, "TLS connection refused: No certificate was found.")


def test_x509_anonymous_client_allowed_without_verify_peer(migd_factory, tmp_path: Path, ca: Any) -> None:
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca), verify_peer=False)
    src = _source(migd_factory, client_dir(tmp_path / "anon", ca, cn=None))
    _completes(src, dst, uri)


def test_x509_authz_friendly_client_completes(migd_factory, tmp_path: Path, ca: Any) -> None:
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca), authz=f"CN={CLIENT_NAME}")
    src = _source(migd_factory, client_dir(tmp_path / "cli", ca))
    _completes(src, dst, uri)


def test_x509_authz_refuses_a_client_whose_dn_does_not_match(migd_factory, tmp_path: Path, ca: Any) -> None:
    """QEMU's hostile client: a certificate of the right CA, but not the DN tls-authz allows."""
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca), authz=f"CN={CLIENT_NAME}")
    src = _source(migd_factory, client_dir(tmp_path / "hacker", ca, cn=HOSTILE_NAME))
    _refused(src, dst, uri, f"TLS connection refused: TLS x509 authz check for CN={HOSTILE_NAME} is denied")


def test_plain_source_cannot_talk_to_a_tls_destination(migd_factory, tmp_path: Path, ca: Any) -> None:
    """A source without tls-creds sends a plain stream: the destination's handshake fails at once, it
    keeps listening, and a TLS source then migrates."""
    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca))
    src = _source(migd_factory, None)
    _refused(src, dst, uri, "TLS connection refused: TLS handshake failed")
    assert src.cmd_raw("object-add", _x509("c0", client_dir(tmp_path / "cli", ca), "client")) == {"return": {}}
    src.cmd("migrate-set-parameters", **{"tls-creds": "c0"})
    _completes(src, dst, uri)


def test_tls_source_cannot_talk_to_a_plain_destination(migd_factory, tmp_path: Path, ca: Any) -> None:
    dst = migd_factory("dst", "-m", MEM, "--incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src = _source(migd_factory, client_dir(tmp_path / "cli", ca))
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = wait_status(src, "failed", 30)
    assert info["error-desc"].startswith("TLS handshake failed"), info
    assert run_status(src) == "running"


def test_refusals_in_qemu_words(migd_factory, tmp_path: Path, ca: Any) -> None:
    src = migd_factory("src", "-m", MEM)
    # nothing named: migrate itself succeeds, the migration fails with QEMU's text
    src.cmd("migrate-set-parameters", **{"tls-creds": "nope"})
    src.cmd("migrate", uri="tcp:127.0.0.1:1")
    assert wait_status(src, "failed", 10)["error-desc"] == "No TLS credentials with id 'nope'"
    src.cmd_raw("object-add", _x509("srv0", server_dir(tmp_path / "srv", ca), "server"))
    src.cmd("migrate-set-parameters", **{"tls-creds": "srv0"})
    src.cmd("migrate", uri="tcp:127.0.0.1:1")
    assert wait_status(src, "failed", 10)["error-desc"] == "Expected TLS credentials for a client endpoint"
    # only tcp channels: refused by migrate, nothing changes
    err = src.cmd_error("migrate", uri=f"unix:{tmp_path}/x.sock")
    assert err["desc"] == "TLS is only supported on tcp migration channels by migd"
    assert src.cmd("query-migrate")["status"] == "failed"
    # object-add / object-del texts
    assert src.cmd_raw("object-add", {"qom-type": "tls-creds-psk", "id": "p0", "dir": str(tmp_path),
                                      "endpoint": "client"})["error"]["desc"].startswith(
        "tls-creds-psk is not supported by migd")
    dup = src.cmd_raw("object-add", _x509("srv0", tmp_path / "srv", "server"))
    assert dup["error"]["desc"] == "attempt to add duplicate property 'srv0' to object (type 'container')"
    bad = src.cmd_raw("object-add", {"qom-type": "tls-creds-x509", "id": "b0", "dir": str(tmp_path),
                                     "verify-peer": "yes"})
    assert bad["error"]["desc"] == "Invalid parameter type for 'verify-peer', expected: boolean"
    assert src.cmd_raw("object-del", {"id": "zz"})["error"]["desc"] == "object 'zz' not found"
    assert src.cmd_raw("object-del", {"id": "srv0"}) == {"return": {}}
    assert run_status(src) == "running"


def test_objects_from_the_command_line_and_toml(migd_factory, tmp_path: Path, ca: Any) -> None:
    """``--object`` for the destination, the TOML ``object`` key for the source; a bad one exits 2."""
    srv, cli = server_dir(tmp_path / "srv", ca), client_dir(tmp_path / "cli", ca)
    dst = migd_factory("dst", "-m", MEM, "--incoming", "defer",
                       "--object", f"tls-creds-x509,id=tls0,dir={srv},endpoint=server,verify-peer=on",
                       "--object", f"authz-simple,id=auth0,identity=CN={CLIENT_NAME}")
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-authz": "auth0"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    toml = tmp_path / "src.toml"
    toml.write_text(f'memory = "{MEM}"\n[[object]]\n"qom-type" = "tls-creds-x509"\nid = "tls0"\n'
                    f'dir = "{cli}"\nendpoint = "client"\n')
    src = migd_factory("src", "--config", str(toml))
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    _completes(src, dst, f"tcp:127.0.0.1:{port}")
    bad = migd_factory("bad", "--object", f"tls-creds-x509,id=t,dir={tmp_path},endpoint=server", connect=False)
    assert bad.wait(30) == 2
    assert f"Unable to access credentials {tmp_path}/ca-cert.pem" in bad.log()


def test_cancel_and_quit_end_a_handshake_with_a_silent_peer(migd_factory, tmp_path: Path, ca: Any) -> None:
    """A peer that accepts (or connects) and then says nothing: ``migrate_cancel`` ends the source's
    handshake at once, and ``quit`` the destination's, long before the 30 s handshake limit."""
    silent = socket.create_server(("127.0.0.1", 0))
    src = _source(migd_factory, client_dir(tmp_path / "cli", ca))
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{silent.getsockname()[1]}")
    peer, _ = silent.accept()  # connected: the source now waits in its handshake
    assert src.cmd("query-migrate")["status"] == "setup"
    started = time.monotonic()
    src.cmd("migrate_cancel")
    wait_status(src, "cancelled", 5)
    assert time.monotonic() - started < 3
    assert run_status(src) == "running"
    peer.close()
    silent.close()

    dst, uri = _destination(migd_factory, server_dir(tmp_path / "srv", ca))
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    mute = socket.create_connection((host, int(port)))
    poll(lambda: dst.cmd("query-migrate")["status"] == "setup", 5, "the destination listening")
    started = time.monotonic()
    assert dst.quit(10) == 0
    assert time.monotonic() - started < 5
    mute.close()
