"""A local certificate authority: the sandbox's TLS certificates (and the tests').

``scripts/sandbox --tls`` calls :func:`sandbox_certificates` once: a CA and a
server certificate for 127.0.0.1/localhost, kept in ``<data dir>/tls``
(keys 0600) and reused on later runs. Clients trust ``ca.pem``
(``curl --cacert``). For a real site the hospital's PKI issues these.

P-256 keys: quick to make, and every TLS 1.2/1.3 client speaks ECDSA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if "://" in name:
            return x509.UniformResourceIdentifier(name)
        return x509.DNSName(name)


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.pem`` and ``<stem>-key.pem`` (0600) in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_bytes = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_bytes)
        os.chmod(key_path, 0o600)
        return cert_path, key_path


@dataclass(frozen=True)
class Authority(Issued):
    """A CA that signs server and client certificates."""

    @classmethod
    def create(cls, common_name: str, days: int = 3650) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            _builder(_name(common_name), _name(common_name), key.public_key(), now, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self,
        common_name: str,
        names: tuple[str, ...] = (),
        *,
        client: bool = False,
        days: int = 825,
    ) -> Issued:
        """A leaf certificate: ``names`` become subjectAltNames (DNS, IP or URI)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            _builder(
                _name(common_name),
                self.cert.subject,
                key.public_key(),
                dt.datetime.now(dt.UTC),
                days,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names:
            alt = x509.SubjectAlternativeName([_alt_name(n) for n in names])
            builder = builder.add_extension(alt, critical=False)
        return Issued(key, builder.sign(self.key, hashes.SHA256()))


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # clocks differ a little
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class SandboxTls:
    ca_file: Path
    cert_file: Path
    key_file: Path


def sandbox_certificates(data_dir: Path) -> SandboxTls:
    """The sandbox's CA and server certificate in ``<data_dir>/tls``, made on first use."""
    directory = data_dir / "tls"
    files = SandboxTls(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    if not all(path.exists() for path in (files.ca_file, files.cert_file, files.key_file)):
        authority = Authority.create("ehrbridge sandbox local CA")
        authority.write(directory, "ca")
        authority.issue("localhost", LOCAL_NAMES).write(directory, "server")
    return files
