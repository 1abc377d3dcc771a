"""CDS Hooks: trusting the CDS client (https://cds-hooks.hl7.org/2.0/#trusting-cds-clients).

Each hook call carries ``Authorization: Bearer <JWT>`` signed by the EHR. It
is taken only when

* its ``iss`` is on the site's allowlist (``cds_hooks.clients``), and the
  signature verifies with that issuer's JWK Set: ``jwks_url`` / ``jwks_file``,
  or the header's ``jku`` -- which must itself be one the issuer is allowed
  (``jwks_url`` or ``jku``), never a URL the token chooses freely;
* its ``alg`` is one of the issuer's (asymmetric only, never ``none``);
* ``aud`` is this service's URL (``cds_hooks.service_base_url`` +
  ``/cds-services/<id>``), ``exp`` has not passed and is no further than
  ``max_token_lifetime_s`` ahead, and ``iss``, ``sub``, ``iat``, ``jti`` are
  present (the specification requires them);
* its ``jti`` was not seen before from that issuer: seen ``jti`` values are
  remembered until their token expires, in a cache of bounded size.

Anything else is a 401 and no card.
"""

from __future__ import annotations

import heapq
import threading
import time
from typing import Any

from ehrbridge.adapters.jwks import JwksSource
from ehrbridge.auth import (
    AuthFailure,
    Principal,
    bearer_token,
    unverified_header,
    unverified_issuer,
    verified_claims,
)
from ehrbridge.config import CdsClient, CdsHooks

_REQUIRED = ("iat", "jti", "sub")


class ReplayCache:
    """``jti`` values seen, each kept until its token's ``exp``; at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._expiry: dict[str, float] = {}
        self._queue: list[tuple[float, str]] = []  # (exp, key), soonest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def claim(self, key: str, expires_at: float, now: float) -> None:
        """Note ``key``; 401 if it is still remembered, 503 if the cache is full."""
        with self._lock:
            self._forget_expired(now)
            if key in self._expiry:
                raise AuthFailure(401, "the token was used before (jti)")
            if len(self._expiry) >= self.capacity:
                raise AuthFailure(503, "too many unexpired CDS tokens to remember; try later")
            self._expiry[key] = expires_at
            heapq.heappush(self._queue, (expires_at, key))

    def _forget_expired(self, now: float) -> None:
        while self._queue and self._queue[0][0] < now:
            _, key = heapq.heappop(self._queue)
            self._expiry.pop(key, None)


class TrustedClient:
    """One allowlisted EHR: its JWK Sets by where they come from."""

    def __init__(self, config: CdsClient) -> None:
        self.config = config
        self.default: JwksSource | None = None
        if config.jwks_url is not None or config.jwks_file is not None:
            self.default = JwksSource(url=config.jwks_url, file=config.jwks_file)
        self.by_jku = {url: JwksSource(url=url) for url in config.jku}
        if config.jwks_url is not None and self.default is not None:
            self.by_jku[config.jwks_url] = self.default

    def keys(self, header: dict[str, Any]) -> JwksSource:
        jku = header.get("jku")
        if jku is None:
            if self.default is None:
                raise AuthFailure(401, "the token names no jku and the issuer has no jwks_url")
            return self.default
        source = self.by_jku.get(jku) if isinstance(jku, str) else None
        if source is None:
            raise AuthFailure(401, "the token's jku is not one allowed for its issuer")
        return source

    def close(self) -> None:
        for source in {id(s): s for s in [self.default, *self.by_jku.values()] if s}.values():
            source.close()


class CdsClientAuth:
    """Verifies the EHR's JWT on every CDS Hooks call."""

    def __init__(self, config: CdsHooks) -> None:
        self.config = config
        self.clients = {c.issuer: TrustedClient(c) for c in config.clients}
        self.replay = ReplayCache(config.replay_cache_size)

    def verify(self, authorization: str | None, audiences: list[str]) -> Principal:
        """The calling EHR, if its JWT holds for one of ``audiences``; else AuthFailure."""
        token = bearer_token(authorization)
        header = unverified_header(token)
        issuer = unverified_issuer(token) or ""
        client = self.clients.get(issuer)
        if client is None:
            raise AuthFailure(401, "the token's issuer is not an allowed CDS client (iss)")
        claims = verified_claims(
            token,
            header,
            client.keys(header),
            client.config.algorithms,
            issuer=issuer,
            audience=audiences,
            leeway_s=self.config.leeway_s,
            require=_REQUIRED,
        )
        self._not_replayed(issuer, claims)
        return Principal(str(claims["sub"]), frozenset(), f"cds {issuer}")

    def _not_replayed(self, issuer: str, claims: dict[str, Any]) -> None:
        now = time.time()
        expires_at = float(claims["exp"])
        if expires_at - now > self.config.max_token_lifetime_s + self.config.leeway_s:
            raise AuthFailure(401, "the token's exp is too far ahead (max_token_lifetime_s)")
        self.replay.claim(f"{issuer} {claims['jti']}", expires_at + self.config.leeway_s, now)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
