"""Who may call the HTTP API: bearer tokens and roles.

Every route declares the role it needs (``Authenticator.require(role)``, a
FastAPI dependency; the FHIR routes call :meth:`Authenticator.authorize`).
Only the routes in :data:`PUBLIC_ROUTES` answer without a token. A caller
proves who it is with ``Authorization: Bearer <token>`` (RFC 6750), where the
token is either

* a **static API token** (``auth.tokens``): a random secret read from the
  environment or a file at start-up. Only its SHA-256 is kept; a presented
  token is hashed and compared with every known hash in constant time
  (``hmac.compare_digest``), so timing tells nothing of how much matched;
* a **JWT access token** from a configured issuer (``auth.jwt``: OpenID
  Connect, a SMART authorization server), verified by PyJWT against the
  issuer's JWK Set with ``iss``, ``aud``, ``exp`` and ``nbf`` checked. Only
  asymmetric algorithms from the issuer's list are taken: ``alg: none`` and
  HS256 signed with a public key (algorithm confusion) never verify.

Roles (``ApiRole``): ``viewer`` reads results, patients and monitoring;
``operator`` also dead letters; ``admin`` may do everything, including the
audit trail; ``sender`` is an EHR or interface engine and may only send FHIR.

The operator console (``ehrbridge/console.py``) signs in with the same tokens:
a user presents one on ``/console/login`` and gets a **session cookie**
(:class:`Sessions`: opaque, random, kept server-side by its SHA-256, HttpOnly,
SameSite=Strict, Secure over TLS, 8 hours). Every route accepts the cookie
where it accepts a bearer token. A request that changes something (any method
but GET, HEAD, OPTIONS) on the cookie must also carry the session's CSRF token
(``X-CSRF-Token`` header or a ``csrf`` form field) and, when the browser sends
``Origin``, come from this host: SameSite=Strict alone leaves older browsers
and same-site subdomains open.

Refusals: **401** with ``WWW-Authenticate: Bearer`` when no valid token came,
**403** when the token's roles do not include the route's. Neither says
anything about the request beyond that; tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jwt
from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ehrbridge.adapters.jwks import JwksSource, JwksUnavailable, KeyNotFound
from ehrbridge.adapters.smart_auth import read_secret
from ehrbridge.config import ApiAuth, ApiRole, JwtIssuer, StaticToken

log = logging.getLogger(__name__)

# (method, path template): what answers without a token, and why.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("GET", "/health"),  # liveness for load balancers and orchestrators
        ("GET", "/health/live"),
        ("GET", "/health/ready"),
        ("GET", "/cds-services"),  # CDS Hooks discovery: the specification has it open
        ("GET", "/fhir/metadata"),  # FHIR CapabilityStatement: what is taken, no data
        ("GET", "/openapi.json"),  # the API's description (no data): for /docs and clients
        ("GET", "/docs"),  # Swagger UI; its Authorize button takes a token
        ("GET", "/docs/oauth2-redirect"),
        ("GET", "/redoc"),  # the same description, as ReDoc
        ("GET", "/docs/assets/{name}"),  # their scripts and styles (ehrbridge/api_docs.py)
        # SMART EHR launch: sends the browser to the EHR to sign in; no data (smart_launch.py)
        ("GET", "/ui/launch"),
        ("GET", "/"),  # redirects to the console, as /console does
        ("GET", "/console"),  # redirects to the console's first page (which needs a session)
        ("GET", "/console/login"),  # the console's sign-in form: a token in, a cookie out
        ("POST", "/console/login"),
        ("POST", "/console/logout"),  # ends the session it names (with its CSRF token)
        ("GET", "/console/static/{name}"),  # the console's stylesheet, script and icon
    }
)

# Where a request's authenticated caller is kept in the ASGI scope (for the audit trail,
# ehrbridge/audit_http.py): set as soon as the token is verified, before the role check,
# so a refused (403) read is recorded with who tried it.
PRINCIPAL_KEY = "ehrbridge.principal"

# What each role may do: a role grants itself and the roles listed.
GRANTS: dict[ApiRole, frozenset[ApiRole]] = {
    ApiRole.VIEWER: frozenset({ApiRole.VIEWER}),
    ApiRole.OPERATOR: frozenset({ApiRole.VIEWER, ApiRole.OPERATOR}),
    ApiRole.ADMIN: frozenset(ApiRole),
    ApiRole.SENDER: frozenset({ApiRole.SENDER}),
}

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT or static API token",
    description="A static API token (auth.tokens) or a JWT from an issuer in auth.jwt.",
)
_BEARER = Security(bearer_scheme)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name for the audit trail, its roles, how it proved it."""

    name: str
    roles: frozenset[ApiRole]
    via: str  # "token", "jwt <issuer>", "subscription", "cds <issuer>"

    def may(self, role: ApiRole) -> bool:
        return any(role in GRANTS[held] for held in self.roles)


class AuthFailure(Exception):
    """A refused request: 401 (who are you?), 403 (not allowed) or 503 (cannot check now)."""

    def __init__(self, status: int, message: str, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error = error

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 503:
            return {"Retry-After": "5"}
        if self.status == 403:
            return {"WWW-Authenticate": 'Bearer error="insufficient_scope"'}
        return {"WWW-Authenticate": _challenge(self.error)}


def _challenge(error: str) -> str:
    # RFC 6750 section 3: no error code when the request carried no token at all.
    return "Bearer" if error == "" else f'Bearer error="{error}"'


SESSION_COOKIE = "ehrbridge_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Session:
    """A signed-in console user: who, the CSRF token of their forms, until when."""

    principal: Principal
    csrf: str
    expires: float


class Sessions:
    """Console sessions, server-side: the cookie is a random id; only its SHA-256 is kept.

    In memory: a restart signs everyone out, which a console can afford and a
    leaked session file cannot. At most ``limit`` live sessions; the oldest goes first.
    """

    def __init__(self, ttl_s: float = 8 * 3600, limit: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._lock = threading.Lock()
        self._live: dict[bytes, Session] = {}

    def open(self, principal: Principal) -> tuple[str, Session]:
        session_id = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), time.time() + self.ttl_s)
        with self._lock:
            while len(self._live) >= self.limit:
                self._live.pop(next(iter(self._live)))
            self._live[token_digest(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        key = token_digest(session_id)
        with self._lock:
            session = self._live.get(key)
            if session is not None and session.expires < time.time():
                del self._live[key]
                return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._live.pop(token_digest(session_id), None)


def same_origin(origin: str | None, host: str | None) -> bool:
    """No ``Origin`` (not a cross-site browser request), or one naming this host."""
    return origin is None or (host is not None and urlsplit(origin).netloc == host)


MISSING = AuthFailure(401, "a bearer token is required (Authorization: Bearer ...)", error="")
INVALID = AuthFailure(401, "the bearer token is not valid")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class StaticTokens:
    """Named tokens by their SHA-256; the secrets themselves are not kept."""

    def __init__(self, tokens: Iterable[StaticToken]) -> None:
        self._known: list[tuple[bytes, Principal]] = []
        for index, token in enumerate(tokens):
            secret = read_secret(
                token.token_env, token.token_file, "the API token", f"auth.tokens.{index}"
            )
            principal = Principal(token.name, frozenset({token.role}), "token")
            self._known.append((token_digest(secret), principal))

    def __len__(self) -> int:
        return len(self._known)

    def match(self, token: str) -> Principal | None:
        digest = token_digest(token)
        found = None
        for known, principal in self._known:  # every one compared: no early exit
            if hmac.compare_digest(digest, known):
                found = principal
        return found


class JwtBearer:
    """Access tokens of one issuer, verified against its JWK Set."""

    def __init__(self, issuer: JwtIssuer, keys: JwksSource | None = None) -> None:
        self.config = issuer
        self.keys = keys or JwksSource(
            url=issuer.jwks_url, file=issuer.jwks_file, cache_s=issuer.jwks_cache_s
        )

    def verify(self, token: str, header: dict[str, Any]) -> Principal:
        claims = verified_claims(
            token,
            header,
            self.keys,
            self.config.algorithms,
            issuer=self.config.issuer,
            audience=self.config.audience,
            leeway_s=self.config.leeway_s,
        )
        name = claims.get(self.config.subject_claim)
        if not isinstance(name, str) or not name:
            raise AuthFailure(401, f"the token has no {self.config.subject_claim} claim")
        return Principal(name, self._roles(claims), f"jwt {self.config.issuer}")

    def _roles(self, claims: dict[str, Any]) -> frozenset[ApiRole]:
        value = claims.get(self.config.roles_claim)
        granted = value.split() if isinstance(value, str) else value
        if not isinstance(granted, list):
            return frozenset()
        names = self.config.role_values or {role.value: role for role in ApiRole}
        return frozenset(names[g] for g in granted if isinstance(g, str) and g in names)

    def close(self) -> None:
        self.keys.close()


def verified_claims(
    token: str,
    header: dict[str, Any],
    keys: JwksSource,
    algorithms: Iterable[str],
    *,
    issuer: str,
    audience: str | list[str],
    leeway_s: float,
    require: Iterable[str] = (),
) -> dict[str, Any]:
    """The claims of a JWT whose signature, ``iss``, ``aud``, ``exp`` and ``nbf`` hold.

    The algorithm is pinned twice: the header's ``alg`` must be on the list,
    and PyJWT is given only that one with a key whose type fits it.
    """
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in set(algorithms):
        raise AuthFailure(401, "the token's signing algorithm is not accepted")
    kid = header.get("kid")
    try:
        key = keys.key(kid if isinstance(kid, str) else None, algorithm)
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            leeway=leeway_s,
            options={"require": ["exp", "iss", "aud", *require]},
        )
    except JwksUnavailable as exc:
        raise AuthFailure(503, "the token's signing keys cannot be loaded now") from exc
    except (KeyNotFound, jwt.InvalidTokenError) as exc:
        log.info("bearer JWT refused: %s", type(exc).__name__)
        raise AuthFailure(401, _why(exc)) from exc
    return claims


def _why(exc: Exception) -> str:
    """What the caller may be told: the check that failed, nothing of the token."""
    reasons: list[tuple[type[Exception], str]] = [
        (jwt.ExpiredSignatureError, "the token has expired"),
        (jwt.ImmatureSignatureError, "the token is not valid yet (nbf/iat)"),
        (jwt.InvalidAudienceError, "the token is not for this service (aud)"),
        (jwt.InvalidIssuerError, "the token's issuer is not accepted (iss)"),
        (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
        (KeyNotFound, "the token's signing key is not known (kid)"),
    ]
    return next((text for kind, text in reasons if isinstance(exc, kind)), INVALID.message)


def unverified_header(token: str) -> dict[str, Any]:
    try:
        return dict(jwt.get_unverified_header(token))
    except jwt.InvalidTokenError as exc:
        raise INVALID from exc


def unverified_issuer(token: str) -> str | None:
    """``iss`` before the signature is checked: only to choose which keys check it."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise INVALID from exc
    issuer = claims.get("iss")
    return issuer if isinstance(issuer, str) else None


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header; 401 when there is none."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise MISSING
    return token.strip()


class Authenticator:
    """The site's API credentials: static tokens and JWT issuers."""

    def __init__(self, auth: ApiAuth, issuers: list[JwtBearer] | None = None) -> None:
        self.static = StaticTokens(auth.tokens)
        self.issuers = {i.config.issuer: i for i in issuers or map(JwtBearer, auth.jwt)}
        self.sessions = Sessions()
        if not self.static and not self.issuers:
            log.warning("no API credentials configured (auth): only the public routes answer")

    def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        principal = self.static.match(token)
        if principal is not None:
            return principal
        if token.count(".") != 2 or not self.issuers:
            raise INVALID
        header = unverified_header(token)
        issuer = self.issuers.get(unverified_issuer(token) or "")
        if issuer is None:
            raise AuthFailure(401, "the token's issuer is not accepted (iss)")
        return issuer.verify(token, header)

    def authorize(
        self,
        authorization: str | None,
        role: ApiRole,
        scope: MutableMapping[str, Any] | None = None,
    ) -> Principal:
        """The caller, if it holds ``role``; else AuthFailure. ``scope``: noted for the audit."""
        principal = self.authenticate(authorization)
        if scope is not None:
            scope[PRINCIPAL_KEY] = principal
        if not principal.may(role):
            raise AuthFailure(403, f"this needs the {role.value} role", "insufficient_scope")
        return principal

    def session(self, request: Request) -> Session | None:
        """The console session of the request's cookie, if it is live."""
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def authorize_request(
        self, request: Request, role: ApiRole, authorization: str | None
    ) -> Principal:
        """The caller by bearer token, else by console session; AuthFailure when neither."""
        session = None if authorization else self.session(request)
        if session is None:
            return self.authorize(authorization, role, request.scope)
        if request.method not in SAFE_METHODS:
            _check_csrf(request, session)
        request.scope[PRINCIPAL_KEY] = session.principal
        if not session.principal.may(role):
            raise AuthFailure(403, f"this needs the {role.value} role", "insufficient_scope")
        return session.principal

    def require(self, role: ApiRole) -> Callable[..., Principal]:
        """A FastAPI dependency: the caller, if it holds ``role``; else 401/403."""

        def caller(
            request: Request,
            credentials: HTTPAuthorizationCredentials | None = _BEARER,
        ) -> Principal:
            header = f"Bearer {credentials.credentials}" if credentials else None
            try:
                return self.authorize_request(request, role, header)
            except AuthFailure as failure:
                raise HTTPException(failure.status, failure.message, failure.headers) from None

        caller.__name__ = f"requires_{role.value}"
        return caller

    def close(self) -> None:
        for issuer in self.issuers.values():
            issuer.close()


def _check_csrf(request: Request, session: Session) -> None:
    """A state change on a session cookie: this host's page, with the session's CSRF token."""
    if not same_origin(request.headers.get("origin"), request.headers.get("host")):
        raise AuthFailure(403, "cross-origin request refused", "insufficient_scope")
    presented = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(presented.encode(), session.csrf.encode()):
        raise AuthFailure(403, "the CSRF token is missing or wrong", "insufficient_scope")
