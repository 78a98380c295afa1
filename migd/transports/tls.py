"""TLS on a connected migration socket: the handshake (client or server side) and a Channel over it.

QEMU upgrades a socket channel to TLS when ``tls-creds`` is set; migd does it on tcp channels. The
source wraps its connected socket as the client (the server's certificate checked against
``tls-hostname``, else the URI's host), the destination each accepted socket as the server (a client
certificate demanded when its credentials have ``verify-peer=on``, its DN checked against
``tls-authz``).

An ``SSLSocket`` is not safe for a read and a write at once from two threads (the migration thread
writes while the return-path reader reads), and it has no ``sendmsg``. So the socket is non-blocking
and every record operation runs under one lock; a thread that must wait polls the descriptor *and* a
Waker outside the lock, which is also what lets ``shutdown`` from another thread end a blocked call.
Small buffers are joined into one record-sized write.
"""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from migd.tlscreds import TlsCredsX509, distinguished_name
from migd.transports.base import TransportError
from migd.transports.channel import SocketChannel
from migd.transports.wake import Waker

HANDSHAKE_TIMEOUT = 30.0  # seconds; a peer that says nothing cannot hold a listener longer
WRITE_CHUNK = 256 << 10  # bytes joined into one SSL_write
POLL_SLICE = 1.0  # seconds: a wait re-tries the record layer at least this often
T = TypeVar("T")

# OpenSSL verify codes (X509_V_ERR_*) -> gnutls's words, which QEMU reports
_HOSTNAME_MISMATCH = (62, 64)  # HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH
_UNKNOWN_ISSUER = (2, 18, 19, 20, 21)
_EXPIRED, _NOT_YET_VALID = 10, 9


class TlsError(TransportError):
    """The handshake or the peer checks failed; ``str()`` is the reason in QEMU's words."""


def describe(exc: BaseException, hostname: str | None = None) -> str:
    """An ssl/socket error in the words QEMU (gnutls) uses for the same failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code in _HOSTNAME_MISMATCH:
            return f"Certificate does not match the hostname {hostname}"
        if code in _UNKNOWN_ISSUER:
            return "The certificate hasn't got a known issuer"
        if code == _EXPIRED:
            return "The certificate has expired"
        if code == _NOT_YET_VALID:
            return "The certificate is not yet activated"
        return f"The certificate is not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return "No certificate was found."
        return f"TLS handshake failed: {_words(exc)}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"TLS handshake failed: {exc.strerror}"
    return f"TLS handshake failed: {exc or type(exc).__name__}"


def _words(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words: ``TLSV1_ALERT_UNKNOWN_CA`` -> ``tlsv1 alert unknown ca``."""
    return exc.reason.replace("_", " ").lower() if exc.reason else str(exc)


def _handshake(sock: ssl.SSLSocket, waker: Waker, timeout: float, hostname: str | None) -> None:
    """Run the handshake on the non-blocking ``sock``; woken or timed out, it gives up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(describe(exc, hostname)) from exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise TlsError("TLS handshake failed: timed out")
        if waker.wait(sock.fileno(), events, timeout=left) is False:
            raise TlsError("TLS handshake failed: cancelled")


def _wrap(raw: SocketChannel, creds: TlsCredsX509, server_side: bool, hostname: str | None,
          waker: Waker, timeout: float) -> TlsChannel:
    sock = raw.sock
    try:
        tls = creds.context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                        server_hostname=None if server_side else hostname)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raw.close()
        raise TlsError(describe(exc, hostname)) from exc
    tls.setblocking(False)
    try:
        _handshake(tls, waker, timeout, hostname)
    except TlsError:
        tls.close()
        raise
    return TlsChannel(tls)


def client(raw: SocketChannel, creds: TlsCredsX509, hostname: str, waker: Waker,
           timeout: float = HANDSHAKE_TIMEOUT) -> TlsChannel:
    """The source side: TLS over the connected ``raw`` (closed on failure). (migration connect worker)"""
    return _wrap(raw, creds, False, hostname, waker, timeout)


def server(raw: SocketChannel, creds: TlsCredsX509, authz: Callable[[str], bool] | None,
           waker: Waker, timeout: float = HANDSHAKE_TIMEOUT) -> TlsChannel:
    """The destination side: TLS over the accepted ``raw``, then the ``tls-authz`` check on the client
    certificate's DN (skipped with ``verify-peer=off``, as in QEMU). (incoming thread)"""
    channel = _wrap(raw, creds, True, None, waker, timeout)
    if authz is not None and creds.verify_peer:
        dn = distinguished_name(channel.sock.getpeercert())
        if not authz(dn):
            channel.close()
            raise TlsError(f"TLS x509 authz check for {dn} is denied")
    return channel


def _shut_error() -> OSError:
    return OSError(errno.ESHUTDOWN, "Channel was shut down")


class TlsChannel(SocketChannel):
    """A Channel over an established TLS session (a SocketChannel, so tcp options still apply)."""

    has_return_path = True

    def __init__(self, sock: ssl.SSLSocket) -> None:
        super().__init__(sock)  # socket buffers, as for plain tcp
        sock.setblocking(False)
        self.sock: ssl.SSLSocket = sock
        self.name = "tls"
        self._lock = threading.Lock()
        self._waker = Waker()
        self._closed = False

    def _run(self, op: Callable[[], T], eof: T | None = None) -> T:
        """One record operation under the lock, waiting (outside it) while OpenSSL wants I/O."""
        while True:
            if self._waker.woken:
                raise _shut_error()
            with self._lock:
                try:
                    return op()
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    if eof is None:
                        raise self._write_refused() from None
                    return eof
                except ssl.SSLError as exc:
                    if self._waker.woken:
                        raise _shut_error() from exc
                    raise OSError(errno.EPROTO, f"TLS channel error: {_words(exc)}") from exc
                except OSError as exc:
                    if self._waker.woken:
                        raise _shut_error() from None
                    if eof is None and exc.errno in (errno.EPIPE, errno.ECONNRESET):
                        raise self._write_refused() from exc
                    raise
            if self._waker.wait(self.sock.fileno(), events, timeout=POLL_SLICE) is False:
                raise _shut_error()

    def _write_refused(self) -> OSError:
        """A write found the session closed. With TLS 1.3 a server refuses our certificate only after
        our side of the handshake finished, so say why if its alert is waiting. (under the lock)"""
        reason = "the peer closed it"
        try:
            self.sock.recv(1)
        except ssl.SSLError as exc:
            if "ALERT" in (exc.reason or ""):
                reason = f"the peer refused the session ({_words(exc)})"
        except OSError:
            pass
        return OSError(errno.EPIPE, f"Cannot write to TLS channel: {reason}")

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        """(writing thread) One record-sized write: a large first buffer alone, small ones joined."""
        head = memoryview(bufs[0]).cast("B")
        if len(head) >= WRITE_CHUNK // 4 or len(bufs) == 1:
            data: Any = head[:WRITE_CHUNK]
        else:
            parts, size = [], 0
            for buf in bufs:
                mv = memoryview(buf).cast("B")
                if size and size + len(mv) > WRITE_CHUNK:
                    break
                parts.append(mv[:WRITE_CHUNK - size])
                size += len(parts[-1])
            data = b"".join(parts)
        sock = self.sock
        return self._run(lambda: sock.send(data))

    def read_into(self, mv: Any) -> int:
        """(reading thread) What is available, at least one byte; 0 at the end of the stream."""
        view = memoryview(mv)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        return self._run(lambda: self._read_records(view), 0)

    def _read_records(self, view: memoryview) -> int:
        """One SSL_read gives at most one record (16 KiB): go on while more is already here, so a
        large read costs one trip through the lock, not one per record. (under the lock)"""
        total = self.sock.recv_into(view)
        while total and total < len(view):
            try:
                n = self.sock.recv_into(view[total:])
            except (ssl.SSLError, OSError):  # nothing more now, or an error the next call reports
                break
            if not n:
                break
            total += n
        return total

    def shutdown(self) -> None:
        """Wake blocked I/O and make later I/O fail; the raw socket is shut too. (any thread)"""
        self._shut = True
        self._waker.wake()
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the descriptor, not the TLS layer
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._shut = True
        self._waker.release()
        self.sock.close()
