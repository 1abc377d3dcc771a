"""TLS for every listener and client: contexts, subject pinning, certificate reload.

Listeners (MLLP, HTTP) speak TLS 1.2 or newer only. With ``client_ca_file``
they require a client certificate that chains to that CA (mTLS); MLLP can
also pin the client by subject (CN or a DNS/URI subjectAltName), checked
after the handshake.

A certificate is renewed without a restart: :class:`CertificateReloader`
loads the files again into the **same** ``SSLContext`` when their
modification time changes (or on SIGHUP). OpenSSL copies the certificate
into each connection at its handshake, so new connections get the new one,
open connections keep theirs, and the listening socket is never touched.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

from ehrbridge.config import ClientTls, ListenerTls
from ehrbridge.core.errors import ConfigError

log = logging.getLogger(__name__)


def server_context(tls: ListenerTls, field: str) -> ssl.SSLContext:
    """A listener's context; ConfigError naming ``field`` if a file cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(context, tls.cert_file, tls.key_file, field)
    if tls.client_ca_file is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, tls.client_ca_file, f"{field}.client_ca_file")
    return context


def client_context(tls: ClientTls | None, field: str) -> ssl.SSLContext:
    """A verifying client context: system CAs, or ``ca_file``; a client cert if given."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is None:
        return context
    if tls.ca_file is not None:
        _load_ca(context, tls.ca_file, f"{field}.ca_file")
    if tls.cert_file is not None and tls.key_file is not None:
        load_chain(context, tls.cert_file, tls.key_file, field)
    return context


def httpx_verify(tls: ClientTls | None, field: str) -> ssl.SSLContext | bool:
    """What httpx's ``verify=`` gets: True (system CAs, always checked) or our context."""
    return True if tls is None else client_context(tls, field)


def load_chain(context: ssl.SSLContext, cert: Path, key: Path, field: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the certificate {cert} with key {key}: {_why(exc)}", field=field
        ) from exc


def _load_ca(context: ssl.SSLContext, ca: Path, field: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA file {ca}: {_why(exc)}", field=field) from exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, ssl.SSLError):
        return os.strerror(exc.errno)
    return str(exc)


def peer_subjects(certificate: dict[str, Any]) -> set[str]:
    """CN and DNS/URI subjectAltNames of a verified peer certificate (``getpeercert()``)."""
    names = {
        value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"
    }
    names.update(
        value for kind, value in certificate.get("subjectAltName", ()) if kind in ("DNS", "URI")
    )
    return names


def subject_allowed(certificate: dict[str, Any] | None, allowed: list[str]) -> bool:
    """Whether a client passes the subject pin (no pin: any CA-signed certificate)."""
    if not allowed:
        return True
    return certificate is not None and bool(peer_subjects(certificate) & set(allowed))


class CertificateReloader:
    """Reloads a listener's certificate into its live context when the files change."""

    def __init__(self, context: ssl.SSLContext, tls: ListenerTls, what: str) -> None:
        self.context = context
        self.tls = tls
        self.what = what  # "mllp", "http": for the log line
        self._stamp = self._mtimes()
        self.reloads = 0

    def _mtimes(self) -> tuple[float, float]:
        try:
            return (self.tls.cert_file.stat().st_mtime, self.tls.key_file.stat().st_mtime)
        except OSError:
            return (0.0, 0.0)  # being replaced: try again on the next check

    def _files(self) -> tuple[Path, Path]:
        return self.tls.cert_file, self.tls.key_file

    def check(self) -> bool:
        """Reload if either file changed since the last load; True if reloaded."""
        stamp = self._mtimes()
        if stamp in (self._stamp, (0.0, 0.0)):
            return False
        return self.reload(stamp)

    def reload(self, stamp: tuple[float, float] | None = None) -> bool:
        """Load the files again; a broken new pair is logged and the old one kept."""
        try:
            # A scratch context first: a failed load can leave a context half-changed
            # (new certificate, old key), and that one serves every new handshake.
            load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), *self._files(), self.what)
            load_chain(self.context, *self._files(), self.what)
        except ConfigError as error:
            log.warning("%s TLS certificate not reloaded, the old one stays: %s", self.what, error)
            return False
        self._stamp = stamp or self._mtimes()
        self.reloads += 1
        log.info("%s TLS certificate reloaded from %s", self.what, self.tls.cert_file)
        return True
