"""Authentication to the EHR's FHIR server: a static bearer token or SMART Backend Services.

Credentials never sit in the site YAML: it names an environment variable or
a file (``writeback.auth`` in docs/config.md), read here at start-up, so a
missing secret stops the site with a :class:`ConfigError` instead of failing
every write later.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html):

1. the token endpoint comes from the config, else from
   ``<fhir_base>/.well-known/smart-configuration`` (``token_endpoint``);
2. the client signs a JWT assertion with its private key (RS384 or ES384;
   header ``kid``, and ``jku`` when a JWKS URL is registered) with claims
   ``iss = sub = client_id``, ``aud = token endpoint``, a fresh ``jti`` and
   ``exp`` five minutes ahead, the maximum the specification allows;
3. it posts ``grant_type=client_credentials`` with the assertion and scope;
4. the access token is cached until shortly before ``expires_in`` runs out,
   shared by every request and thread, and dropped at once when the FHIR
   server answers 401 so that the next request fetches a new one.

A token endpoint that is down or refuses the client is an
:class:`UpstreamUnavailable`: results wait on the retry tiers while someone
fixes the registration, instead of being dead-lettered one by one.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Protocol

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from ehrbridge.config import BearerAuth, FhirAuth, SmartBackendAuth
from ehrbridge.core.errors import ConfigError, UpstreamUnavailable

log = logging.getLogger(__name__)

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300  # the specification's maximum
_DEFAULT_EXPIRES_IN_S = 300  # when the token response leaves expires_in out
_EARLY_REFRESH_S = 30.0  # never use a token in its last half minute


class TokenSource(Protocol):
    """Something that supplies the ``Authorization`` header for FHIR requests."""

    def authorization(self) -> str:
        """The header value, e.g. ``Bearer eyJ...``. May fetch a token."""
        ...

    def invalidate(self) -> None:
        """The server answered 401: forget the cached credential."""
        ...

    def close(self) -> None: ...


def read_secret(env: str | None, file: Path | None, what: str, field: str) -> str:
    """A secret from the environment variable or the file a setting names, never the YAML."""
    if env is not None:
        secret = os.environ.get(env, "").strip()
        where = f"environment variable {env}"
    else:
        assert file is not None
        where = f"file {file}"
        try:
            secret = Path(file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {what}: {exc}", field=field) from exc
    if not secret:
        raise ConfigError(f"{what} {where} is empty or not set", field=field)
    return secret


class StaticBearer:
    """A bearer token from an environment variable or a file (re-read after a 401)."""

    def __init__(self, auth: BearerAuth) -> None:
        self.config = auth
        self._token = self._read()

    def _read(self) -> str:
        config = self.config
        return read_secret(config.token_env, config.token_file, "the bearer token", "auth")

    def authorization(self) -> str:
        return f"Bearer {self._token}"

    def invalidate(self) -> None:
        try:
            self._token = self._read()  # a rotated token file is picked up
        except ConfigError as error:
            log.warning("bearer token could not be re-read: %s", error.detail)

    def close(self) -> None:
        pass  # nothing held open


class SmartBackendServices:
    """OAuth 2.0 client credentials with a signed JWT assertion, token cached until expiry."""

    def __init__(
        self,
        auth: SmartBackendAuth,
        fhir_base: str | None,
        *,
        timeout_s: float = 5.0,
        verify: ssl.SSLContext | bool = True,
        client: httpx.Client | None = None,
    ) -> None:
        self.config = auth
        self.fhir_base = fhir_base.rstrip("/") if fhir_base else None
        if auth.token_url is None and self.fhir_base is None:
            raise ConfigError("no token_url and no FHIR base to discover it from", field="auth")
        self._key = load_private_key(auth)
        self._client = client or httpx.Client(timeout=timeout_s, verify=verify)
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0  # time.monotonic()
        self._token_url = auth.token_url
        self.tokens_fetched = 0

    def authorization(self) -> str:
        with self._lock:  # one fetch for every thread waiting on an expired token
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch()
            assert self._token is not None
            return f"Bearer {self._token}"

    def invalidate(self) -> None:
        with self._lock:
            self._token = None

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            self._token_url = self._discover()
        return self._token_url

    def _discover(self) -> str:
        url = f"{self.fhir_base}/.well-known/smart-configuration"
        try:
            response = self._client.get(url, headers={"accept": "application/json"})
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"SMART configuration unreachable: {type(exc).__name__}", reason="auth.discovery"
            ) from exc
        try:
            endpoint = response.json()["token_endpoint"] if response.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            endpoint = None
        if not isinstance(endpoint, str) or not endpoint:
            raise UpstreamUnavailable(
                f"{url} answered {response.status_code} without a token_endpoint",
                reason="auth.discovery",
            )
        return endpoint

    def assertion(self, token_url: str) -> str:
        """The signed client assertion (a JWT) for one token request."""
        now = int(time.time())
        claims = {
            "iss": self.config.client_id,
            "sub": self.config.client_id,
            "aud": token_url,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        headers = {"kid": self.config.key_id, "typ": "JWT"}
        if self.config.jwks_url:
            headers["jku"] = self.config.jwks_url
        return jwt.encode(claims, self._key, algorithm=self.config.algorithm, headers=headers)

    def _fetch(self) -> None:
        token_url = self.token_url
        form = {
            "grant_type": "client_credentials",
            "scope": self.config.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(token_url),
        }
        try:
            response = self._client.post(
                token_url, data=form, headers={"accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(
                f"token endpoint unreachable: {type(exc).__name__}", reason="auth.token_unavailable"
            ) from exc
        if response.status_code != 200:
            raise UpstreamUnavailable(
                f"token endpoint answered {response.status_code}: {_oauth_error(response)}",
                reason="auth.token_refused",
            )
        try:
            body = response.json()
            token = body["access_token"]
            expires_in = float(body.get("expires_in", _DEFAULT_EXPIRES_IN_S))
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamUnavailable(
                "token endpoint answered without an access_token", reason="auth.token_refused"
            ) from exc
        self._token = str(token)
        margin = min(_EARLY_REFRESH_S, expires_in / 10)
        self._expires_at = time.monotonic() + max(0.0, expires_in - margin)
        self.tokens_fetched += 1
        log.info("SMART access token obtained (expires in %.0fs)", expires_in)

    def close(self) -> None:
        self._client.close()


def _oauth_error(response: httpx.Response) -> str:
    """RFC 6749 section 5.2 error and description; never the request (it holds the assertion)."""
    try:
        body = response.json()
    except ValueError:
        return "no error body"
    if not isinstance(body, dict):
        return "no error body"
    text = str(body.get("error", "unknown error"))
    description = body.get("error_description")
    return f"{text} ({description})"[:300] if description else text


def load_private_key(auth: SmartBackendAuth) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The client's private key, checked against the algorithm (RS384: RSA, ES384: P-384)."""
    if auth.private_key_env is not None:
        pem = os.environ.get(auth.private_key_env, "").encode()
        where = f"environment variable {auth.private_key_env}"
    else:
        assert auth.private_key_file is not None
        where = f"file {auth.private_key_file}"
        try:
            pem = Path(auth.private_key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the private key: {exc}", field="auth") from exc
    if not pem.strip():
        raise ConfigError(f"the private key {where} is empty or not set", field="auth")
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"the private key in {where} is not an unencrypted PEM key", field="auth"
        ) from exc
    if auth.algorithm == "RS384" and isinstance(key, rsa.RSAPrivateKey):
        return key
    if (
        auth.algorithm == "ES384"
        and isinstance(key, ec.EllipticCurvePrivateKey)
        and isinstance(key.curve, ec.SECP384R1)
    ):
        return key
    raise ConfigError(
        f"the private key in {where} does not fit {auth.algorithm} "
        "(RS384 needs an RSA key, ES384 a P-384 EC key)",
        field="auth",
    )


def token_source(
    auth: FhirAuth | None,
    fhir_base: str | None,
    *,
    timeout_s: float = 5.0,
    verify: ssl.SSLContext | bool = True,
) -> TokenSource | None:
    """The token source a site config asks for (None: no authentication)."""
    if auth is None:
        return None
    if isinstance(auth, BearerAuth):
        return StaticBearer(auth)
    return SmartBackendServices(auth, fhir_base, timeout_s=timeout_s, verify=verify)


class HttpxAuth(httpx.Auth):
    """Puts the token on each request; after a 401, fetches a new one and retries once."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self.source.authorization()
        response = yield request
        if response.status_code == 401:
            self.source.invalidate()
            request.headers["Authorization"] = self.source.authorization()
            yield request
