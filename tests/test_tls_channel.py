"""The TLS channel and the objects behind it, over real tcp sockets with certificates made here.

Objects: ``--object`` syntax, QEMU's texts for bad objects, PSK refused. Channel: the handshake's
checks (host name, issuer, client certificate, authz), data both ways at once, and ``shutdown`` from
another thread ending a blocked read.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tls_certs import CLIENT_NAME, HOSTILE_NAME, client_dir, make_ca, server_dir  # noqa: E402

from migd.objects import PSK_UNSUPPORTED, ObjectError, ObjectRegistry, parse_spec  # noqa: E402
from migd.tlscreds import TlsCredsX509  # noqa: E402
from migd.transports import tls  # noqa: E402
from migd.transports.channel import SocketChannel  # noqa: E402
from migd.transports.tls import TlsChannel, TlsError  # noqa: E402
from migd.transports.wake import Waker  # noqa: E402


def _pair() -> tuple[SocketChannel, SocketChannel]:
    """A connected tcp pair on loopback (client, server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        server, _ = listener.accept()
    finally:
        listener.close()
    client.settimeout(None)
    server.settimeout(None)
    return SocketChannel(client), SocketChannel(server)


def _load(directory: Path, endpoint: str, verify_peer: bool = True) -> TlsCredsX509:
    return TlsCredsX509.load(endpoint, str(directory), endpoint, verify_peer)


def _handshake(client_creds: TlsCredsX509, server_creds: TlsCredsX509, hostname: str = "127.0.0.1",
               authz: Callable[[str], bool] | None = None,
               ) -> tuple[TlsChannel | BaseException, TlsChannel | BaseException]:
    """Both sides at once (the server on a thread); each result is a channel or the exception."""
    raw_c, raw_s = _pair()
    result: dict[str, TlsChannel | BaseException] = {}

    def serve() -> None:
        try:
            result["s"] = tls.server(raw_s, server_creds, authz, Waker(), timeout=10)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["s"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        result["c"] = tls.client(raw_c, client_creds, hostname, Waker(), timeout=10)
    except TlsError as exc:
        result["c"] = exc
    thread.join(15)
    assert not thread.is_alive()
    return result["c"], result["s"]


@pytest.fixture
def certs(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = make_ca()
    yield {"ca": ca, "server": server_dir(tmp_path / "server", ca), "client": client_dir(tmp_path / "client", ca),
           "tmp": tmp_path}


def _close(*channels: object) -> None:
    for ch in channels:
        if isinstance(ch, TlsChannel):
            ch.close()


# -- objects -------------------------------------------------------------------------------------


def test_object_spec_syntax_and_qemu_texts(certs: dict[str, Any]) -> None:
    assert parse_spec("tls-creds-x509,id=t0,dir=/a,,b,endpoint=server") == (
        "tls-creds-x509", "t0", {"dir": "/a,b", "endpoint": "server"})
    reg = ObjectRegistry()
    reg.add_spec(f"tls-creds-x509,id=tls0,dir={certs['server']},endpoint=server,verify-peer=on")
    reg.add_spec(f"authz-simple,id=auth0,identity=CN={CLIENT_NAME}")
    cases = {
        f"tls-creds-x509,id=tls0,dir={certs['server']},endpoint=server":
            "attempt to add duplicate property 'tls0' to object (type 'container')",
        "tls-creds-psk,id=psk0,dir=/tmp,endpoint=server": PSK_UNSUPPORTED,
        "tls-creds-x509,id=t1,endpoint=server": "Missing 'dir' property value",
        f"tls-creds-x509,id=t1,dir={certs['tmp']},endpoint=server":
            f"Unable to access credentials {certs['tmp']}/ca-cert.pem",
        f"tls-creds-x509,id=t1,dir={certs['client']},endpoint=server":
            f"Unable to access credentials {certs['client']}/server-cert.pem",
        "tls-creds-x509,id=t1,dir=/tmp,endpoint=middle": "Parameter 'endpoint' does not accept value 'middle'",
        "tls-creds-x509,id=t1,dir=/tmp,verify-peer=maybe": "Parameter 'verify-peer' expects 'on' or 'off'",
        "tls-creds-x509,id=t1,dir=/tmp,priority=NORMAL": "Property 'tls-creds-x509.priority' not found",
        "secret,id=s0,data=x": "invalid object type: secret",
        "tls-creds-x509,dir=/tmp": "Parameter 'id' is missing",
        "tls-creds-x509,id=0bad,dir=/tmp": "Parameter 'id' expects an identifier",
    }
    for spec, text in cases.items():
        with pytest.raises(ObjectError) as info:
            reg.add_spec(spec)
        assert str(info.value) == text, spec
    with pytest.raises(ObjectError, match="^No TLS credentials with id 'nope'$"):
        reg.tls_creds("nope", "server")
    with pytest.raises(ObjectError, match="^Object with id 'auth0' is not TLS credentials$"):
        reg.tls_creds("auth0", "server")
    with pytest.raises(ObjectError, match="^Expected TLS credentials for a client endpoint$"):
        reg.tls_creds("tls0", "client")
    assert reg.tls_creds("tls0", "server").verify_peer
    reg.delete("tls0")
    with pytest.raises(ObjectError, match="^object 'tls0' not found$"):
        reg.delete("tls0")


# -- handshake checks --------------------------------------------------------------------------


def test_matching_credentials_carry_data_both_ways_at_once(certs: dict[str, Any]) -> None:
    """Mutual authentication; 32 MiB each way concurrently, vectored writes of mixed sizes."""
    c, s = _handshake(_load(certs["client"], "client"), _load(certs["server"], "server"))
    assert isinstance(c, TlsChannel) and isinstance(s, TlsChannel), (c, s)
    try:
        assert s.sock.getpeercert()["subject"] == ((("commonName", CLIENT_NAME),),)
        payload = [os.urandom(n) for n in (7, 4096, 1 << 20, 3, 65536) * 6]  # ~32 MiB with small bits
        want = hashlib.sha256(b"".join(payload)).hexdigest()
        size = sum(len(p) for p in payload)
        got: dict[str, str] = {}

        def reader(name: str, ch: TlsChannel) -> None:
            h, left, buf = hashlib.sha256(), size, bytearray(1 << 16)
            while left:
                n = ch.read_into(memoryview(buf)[:min(left, len(buf))])
                assert n > 0
                h.update(buf[:n])
                left -= n
            got[name] = h.hexdigest()

        threads = [threading.Thread(target=reader, args=("s", s)), threading.Thread(target=reader, args=("c", c))]
        for t in threads:
            t.start()
        writers = [threading.Thread(target=ch.write_all, args=(payload,)) for ch in (c, s)]
        for t in writers:
            t.start()
        for t in writers + threads:
            t.join(60)
            assert not t.is_alive()
        assert got == {"s": want, "c": want}
        c.close()  # the peer sees the end of the stream
        assert s.read_into(bytearray(16)) == 0
    finally:
        _close(c, s)


def test_shutdown_from_another_thread_wakes_a_blocked_read(certs: dict[str, Any]) -> None:
    c, s = _handshake(_load(certs["client"], "client"), _load(certs["server"], "server"))
    assert isinstance(c, TlsChannel) and isinstance(s, TlsChannel)
    try:
        error: list[BaseException] = []

        def blocked() -> None:
            try:
                s.read_into(bytearray(100))
            except OSError as exc:
                error.append(exc)

        t = threading.Thread(target=blocked)
        t.start()
        time.sleep(0.2)  # not synchronisation: the read must still be blocked after it (checked below)
        assert t.is_alive() and not error
        started = time.monotonic()
        s.shutdown()
        t.join(5)
        assert not t.is_alive() and time.monotonic() - started < 2
        assert error and "shut down" in str(error[0])
        with pytest.raises(OSError):
            s.write_vectored([b"x"])
    finally:
        _close(c, s)


def test_mismatched_hostname_is_refused_by_the_client(certs: dict[str, Any], tmp_path: Path) -> None:
    other = server_dir(tmp_path / "srv10", certs["ca"], hosts=("10.0.0.1",))
    c, s = _handshake(_load(certs["client"], "client"), _load(other, "server"))
    _close(s)
    assert isinstance(c, TlsError) and str(c) == "Certificate does not match the hostname 127.0.0.1"
    # tls-hostname naming the certificate's host: accepted
    c, s = _handshake(_load(certs["client"], "client"), _load(other, "server"), hostname="10.0.0.1")
    assert isinstance(c, TlsChannel) and isinstance(s, TlsChannel)
    _close(c, s)


def test_client_of_another_ca_is_refused_by_the_server(certs: dict[str, Any], tmp_path: Path) -> None:
    hostile = client_dir(tmp_path / "hostile", certs["ca"], signer=make_ca("another CA"))
    c, s = _handshake(_load(hostile, "client"), _load(certs["server"], "server"))
    _close(c)
    assert isinstance(s, TlsError) and str(s) == "The certificate hasn't got a known issuer"


def test_server_of_another_ca_is_refused_by_the_client(certs: dict[str, Any], tmp_path: Path) -> None:
    rogue = server_dir(tmp_path / "rogue", make_ca("rogue CA"))
    c, s = _handshake(_load(certs["client"], "client"), _load(rogue, "server", verify_peer=False))
    _close(s)
    assert isinstance(c, TlsError) and str(c) == "The certificate hasn't got a known issuer"


def test_anonymous_client_refused_with_verify_peer_accepted_without(certs: dict[str, Any], tmp_path: Path) -> None:
    anon = _load(client_dir(tmp_path / "anon", certs["ca"], cn=None), "client")
    assert not anon.has_cert
    c, s = _handshake(anon, _load(certs["server"], "server"))
    _close(c)
    assert isinstance(s, TlsError) and str(s) == "No certificate was found."
    c, s = _handshake(anon, _load(certs["server"], "server", verify_peer=False))
    assert isinstance(c, TlsChannel) and isinstance(s, TlsChannel)
    _close(c, s)


def test_authz_refuses_a_client_whose_dn_does_not_match(certs: dict[str, Any], tmp_path: Path) -> None:
    allowed = f"CN={CLIENT_NAME}"
    c, s = _handshake(_load(certs["client"], "client"), _load(certs["server"], "server"),
                      authz=lambda dn: dn == allowed)
    assert isinstance(c, TlsChannel) and isinstance(s, TlsChannel)
    _close(c, s)
    hacker = client_dir(tmp_path / "hacker", certs["ca"], cn=HOSTILE_NAME)
    c, s = _handshake(_load(hacker, "client"), _load(certs["server"], "server"), authz=lambda dn: dn == allowed)
    _close(c)
    assert isinstance(s, TlsError) and str(s) == f"TLS x509 authz check for CN={HOSTILE_NAME} is denied"


def test_plain_client_fails_the_handshake_at_once(certs: dict[str, Any]) -> None:
    raw_c, raw_s = _pair()
    raw_c.write_all([b"QEVM\x00\x00\x00\x03" + b"\x00" * 100])
    started = time.monotonic()
    with pytest.raises(TlsError, match="^TLS handshake failed: "):
        tls.server(raw_s, _load(certs["server"], "server"), None, Waker(), timeout=10)
    assert time.monotonic() - started < 5
    raw_c.close()


def test_a_silent_peer_times_out_and_a_wake_cancels(certs: dict[str, Any]) -> None:
    raw_c, raw_s = _pair()
    with pytest.raises(TlsError, match="^TLS handshake failed: timed out$"):
        tls.server(raw_s, _load(certs["server"], "server"), None, Waker(), timeout=0.3)
    raw_c.close()
    raw_c, raw_s = _pair()
    waker = Waker()
    threading.Timer(0.2, waker.wake).start()
    with pytest.raises(TlsError, match="^TLS handshake failed: cancelled$"):
        tls.server(raw_s, _load(certs["server"], "server"), None, waker, timeout=10)
    raw_c.close()
