"""Real certificates for the TLS tests: a CA, its server and client certificates, and
a client certificate from another CA (which the listener must refuse)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from ehrbridge.sandbox.certs import LOCAL_NAMES, Authority


@dataclass(frozen=True)
class CertSet:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN "lab-engine", chains to ca
    client_key: Path
    other_client_cert: Path  # CN "lab-engine" too, but from another CA
    other_client_key: Path
    authority: Authority

    def client_context(self, *, cert: str | None = "good") -> ssl.SSLContext:
        """A client that trusts our CA and shows the good, the foreign or no certificate."""
        context = ssl.create_default_context(cafile=self.ca)
        if cert == "good":
            context.load_cert_chain(self.client_cert, self.client_key)
        elif cert == "other":
            context.load_cert_chain(self.other_client_cert, self.other_client_key)
        return context

    def issue_client(self, common_name: str) -> tuple[Path, Path]:
        return self.authority.issue(common_name, client=True).write(self.directory, common_name)


def make_certs(directory: Path) -> CertSet:
    authority = Authority.create("ehrbridge test CA")
    other = Authority.create("some other CA")
    ca, _ = authority.write(directory, "ca")
    server_cert, server_key = authority.issue("localhost", LOCAL_NAMES).write(directory, "server")
    client = authority.issue("lab-engine", ("lab-engine.hospital.example",), client=True)
    client_cert, client_key = client.write(directory, "client")
    stranger = other.issue("lab-engine", client=True)
    other_cert, other_key = stranger.write(directory, "other-client")
    return CertSet(
        directory,
        ca,
        server_cert,
        server_key,
        client_cert,
        client_key,
        other_cert,
        other_key,
        authority,
    )
