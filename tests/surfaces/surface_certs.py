"""A throwaway CA with a server certificate (127.0.0.1 / localhost) and a client certificate,
written as PEM files for the TLS tests."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
           issuer: x509.Name, *, is_ca: bool, usage: x509.ObjectIdentifier | None,
           sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_certs(directory: Path) -> CertFiles:
    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("protoserve test CA", ca_key, ca_key, _name("protoserve test CA"),
                     is_ca=True, usage=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        "localhost", server_key, ca_key, ca_cert.subject, is_ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("test client", client_key, ca_key, ca_cert.subject, is_ca=False,
                         usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = CertFiles(ca=directory / "ca.pem", server_key=directory / "server.key",
                      server_cert=directory / "server.pem", client_key=directory / "client.key",
                      client_cert=directory / "client.pem")
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    _write_key(server_key, files.server_key)
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    _write_key(client_key, files.client_key)
    files.client_cert.write_bytes(client_cert.public_bytes(pem))
    return files
