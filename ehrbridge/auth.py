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

Refusals: **401** with ``WWW-Authenticate: Bearer`` when no valid token came,
**403** when the token's roles do not include the route's. Neither says
anything about the request beyond that; tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

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

    def require(self, role: ApiRole) -> Callable[..., Principal]:
        """A FastAPI dependency: the caller, if it holds ``role``; else 401/403."""

        def caller(
            request: Request,
            credentials: HTTPAuthorizationCredentials | None = _BEARER,
        ) -> Principal:
            header = f"Bearer {credentials.credentials}" if credentials else None
            try:
                return self.authorize(header, role, request.scope)
            except AuthFailure as failure:
                raise HTTPException(failure.status, failure.message, failure.headers) from None

        caller.__name__ = f"requires_{role.value}"
        return caller

    def close(self) -> None:
        for issuer in self.issuers.values():
            issuer.close()
