"""A throw-away certificate authority for the TLS tests: a CA, a server certificate for localhost / 127.0.0.1
and a client certificate, as PEM files (the ``cryptography`` package; nothing leaves the test's folder)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    return path


def _issue(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usage=None, names=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_certificates(folder: Path) -> dict[str, Path]:
    """PEM files in ``folder``: ``ca`` (the root), ``server_cert``/``server_key`` (localhost, 127.0.0.1),
    ``client_cert``/``client_key`` (client authentication), and ``other_ca`` (a CA nobody trusts)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _issue("lumireg test CA", ca_key, _name("lumireg test CA"), ca_key, ca=True)
    server_key = _key()
    server = _issue(
        "localhost",
        server_key,
        ca.subject,
        ca_key,
        ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        names=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
    )
    client_key = _key()
    client = _issue(
        "lumireg test client", client_key, ca.subject, ca_key, ca=False, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    other_key = _key()
    other = _issue("someone else's CA", other_key, _name("someone else's CA"), other_key, ca=True)
    files = {}
    for name, cert in (("ca", ca), ("server_cert", server), ("client_cert", client), ("other_ca", other)):
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["server_key"] = _write_key(server_key, folder / "server_key.pem")
    files["client_key"] = _write_key(client_key, folder / "client_key.pem")
    return files
