"""Certificates for the TLS tests, made in the test with ``cryptography``, laid out as QEMU's
``tls-creds-x509`` expects (``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``,
``client-cert.pem``/``client-key.pem``). One CA per call of :func:`make_ca`; a "hostile" client is
one whose certificate another CA signed, or whose DN is not the one ``authz-simple`` allows."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_NAME = "qemu-client"
HOSTILE_NAME = "qemu-client-hacker"


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=2))


def make_ca(name: str = "migd test CA") -> CA:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "migd"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = _validity(x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                        .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    builder = builder.add_extension(x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
        critical=True)
    return CA(key, builder.sign(key, hashes.SHA256()))


def _leaf(ca: CA, cn: str, server: bool, hosts: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    key = _key()
    builder = _validity(x509.CertificateBuilder()
                        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                        .issuer_name(ca.cert.subject).public_key(key.public_key())
                        .serial_number(x509.random_serial_number()))
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_ca(directory: Path, ca: CA) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return directory


def server_dir(directory: Path, ca: CA, hosts: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    """The destination's directory: the CA (to check clients) and a server certificate for ``hosts``."""
    write_ca(directory, ca)
    cert, key = _leaf(ca, "migd-server", True, hosts)
    (directory / "server-cert.pem").write_bytes(cert)
    (directory / "server-key.pem").write_bytes(key)
    return directory


def client_dir(directory: Path, ca: CA, *, signer: CA | None = None, cn: str | None = CLIENT_NAME) -> Path:
    """The source's directory: ``ca`` (to check the server) and a client certificate named ``cn``
    signed by ``signer`` (default ``ca``); ``cn=None``: no client certificate (anonymous)."""
    write_ca(directory, ca)
    if cn is not None:
        cert, key = _leaf(signer or ca, cn, False)
        (directory / "client-cert.pem").write_bytes(cert)
        (directory / "client-key.pem").write_bytes(key)
    return directory
