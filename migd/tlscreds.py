"""``tls-creds-x509``: a directory of PEM files in QEMU's layout, turned into Python ``ssl`` contexts.

QEMU's files: ``ca-cert.pem`` (always), ``server-cert.pem`` + ``server-key.pem`` (server endpoint),
``client-cert.pem`` + ``client-key.pem`` (client endpoint, optional: without them the client is
anonymous). ``verify-peer`` (default on) makes a server demand and check a client certificate and a
client check the server's certificate and host name. The context is built once, when the object is
created, so a bad file is refused by ``object-add`` rather than by the migration.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import Any

CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

# X.509 attribute names as Python's getpeercert() spells them -> the short names of a DN string
_SHORT = {"countryName": "C", "stateOrProvinceName": "ST", "localityName": "L", "organizationName": "O",
          "organizationalUnitName": "OU", "commonName": "CN", "domainComponent": "DC",
          "emailAddress": "EMAIL", "userId": "UID", "serialNumber": "serialNumber"}


class TlsCredsError(ValueError):
    """Loading the credentials failed; ``str()`` says which file and why."""


def _path(directory: str, name: str, required: bool) -> str | None:
    path = os.path.join(directory, name)
    if os.access(path, os.R_OK):
        return path
    if required:
        raise TlsCredsError(f"Unable to access credentials {path}")
    return None


@dataclass(frozen=True)
class TlsCredsX509:
    """One ``tls-creds-x509`` object: its properties and the ready ``ssl`` context."""

    id: str
    dir: str
    endpoint: str  # "client" | "server"
    verify_peer: bool
    context: ssl.SSLContext = field(repr=False, compare=False)
    has_cert: bool = True  # False: a client without client-cert.pem (anonymous)

    @classmethod
    def load(cls, obj_id: str, directory: str, endpoint: str, verify_peer: bool) -> TlsCredsX509:
        """Read the directory now (QEMU loads the files when the object completes)."""
        server = endpoint == "server"
        ca = _path(directory, CA_CERT, True)
        cert = _path(directory, SERVER_CERT if server else CLIENT_CERT, server)
        key = _path(directory, SERVER_KEY if server else CLIENT_KEY, server)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if cert is not None and key is not None:
                ctx.load_cert_chain(cert, key)
            elif cert is not None or key is not None:
                missing = CLIENT_KEY if key is None else CLIENT_CERT
                raise TlsCredsError(f"Unable to access credentials {os.path.join(directory, missing)}")
            if verify_peer:
                assert ca is not None
                ctx.load_verify_locations(ca)
        except ssl.SSLError as exc:
            raise TlsCredsError(f"Unable to load credentials in {directory}: {exc.reason or exc}") from None
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        else:
            ctx.check_hostname = verify_peer
            ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
        return cls(obj_id, directory, endpoint, verify_peer, ctx, cert is not None)


def _escape(value: str) -> str:
    """RFC 4514 escaping of one attribute value."""
    out = "".join("\\" + ch if ch in ',+"\\<>;=' else ch for ch in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def distinguished_name(cert: dict[str, Any] | None) -> str:
    """The subject of a peer certificate (``SSLSocket.getpeercert()``) as a DN string, in the
    certificate's own order (``C=..,O=..,CN=..``, as gnutls prints it for QEMU's authz check)."""
    if not cert:
        return ""
    rdns = []
    for rdn in cert.get("subject", ()):
        rdns.append("+".join(f"{_SHORT.get(name, name)}={_escape(value)}" for name, value in rdn))
    return ",".join(rdns)
