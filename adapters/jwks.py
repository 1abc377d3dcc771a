"""JSON Web Key Sets (RFC 7517): the public keys that verify bearer JWTs.

A set comes from a URL (an OpenID Connect ``jwks_uri``, a CDS client's JWKS)
or a file. It is cached for ``cache_s``; a token naming a ``kid`` the cache
does not hold fetches the set again (key rotation), at most once per
``min_refresh_s`` so that tokens with made-up ``kid`` values cannot make us
hammer the issuer. A failed fetch keeps the keys already held.

Parsing and key objects are PyJWT's (``jwt.PyJWKSet``); nothing here verifies
a signature -- ``ehrbridge/auth.py`` and ``ehrbridge/cds_auth.py`` do, with
``jwt.decode`` and a pinned list of algorithms.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1_048_576  # a JWK Set is a few kB; a larger answer is not one


class KeyNotFound(Exception):
    """No key of the set verifies this token (unknown kid, wrong type or alg)."""


class JwksUnavailable(Exception):
    """The set could not be loaded and no earlier copy is held."""


class JwksSource:
    """One JWK Set, from ``url`` or ``file``, cached and refreshed on an unknown kid."""

    def __init__(
        self,
        *,
        url: str | None = None,
        file: Path | None = None,
        cache_s: float = 300.0,
        min_refresh_s: float = 30.0,
        timeout_s: float = 5.0,
    ) -> None:
        if (url is None) == (file is None):
            raise ValueError("a JWK Set comes from exactly one of a URL or a file")
        self.url = url
        self.file = file
        self.cache_s = cache_s
        self.min_refresh_s = min_refresh_s
        self._client = httpx.Client(timeout=timeout_s) if url is not None else None
        self._lock = threading.Lock()
        self._keys: list[jwt.PyJWK] | None = None
        self._loaded_at = float("-inf")  # time.monotonic() of the last load attempt
        self.loads = 0

    @property
    def where(self) -> str:
        return self.url or str(self.file)

    def key(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key for a token's ``kid`` and ``alg``; KeyNotFound or JwksUnavailable."""
        with self._lock:
            if self._keys is None or self._age() > self.cache_s:
                self._load()
            found = _match(self._keys or [], kid, algorithm)
            if found is None and self._age() > self.min_refresh_s:
                self._load()  # perhaps a rotated key
                found = _match(self._keys or [], kid, algorithm)
        if found is None:
            raise KeyNotFound(f"no key in the JWK Set with kid {kid!r} for {algorithm}")
        return found

    def _age(self) -> float:
        return time.monotonic() - self._loaded_at

    def _load(self) -> None:
        self._loaded_at = time.monotonic()
        try:
            keys = jwt.PyJWKSet.from_dict(self._fetch()).keys
        except (OSError, httpx.HTTPError, ValueError, jwt.PyJWKSetError) as exc:
            log.warning("JWK Set %s not loaded: %s", self.where, type(exc).__name__)
            if self._keys is None:
                raise JwksUnavailable(f"the JWK Set {self.where} could not be loaded") from exc
            return
        self._keys = keys
        self.loads += 1

    def _fetch(self) -> Any:
        if self.file is not None:
            return orjson.loads(Path(self.file).read_bytes()[: MAX_JWKS_BYTES + 1])
        assert self._client is not None and self.url is not None
        response = self._client.get(self.url, headers={"accept": "application/json"})
        response.raise_for_status()
        if len(response.content) > MAX_JWKS_BYTES:
            raise ValueError("the JWK Set is larger than 1 MB")
        return orjson.loads(response.content)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _match(keys: list[jwt.PyJWK], kid: str | None, algorithm: str) -> jwt.PyJWK | None:
    """The signing key with this kid (or the only one, when the token names none)."""
    usable = [k for k in keys if _signs(k, algorithm)]
    if kid is None:
        return usable[0] if len(usable) == 1 else None
    return next((k for k in usable if k.key_id == kid), None)


def _signs(key: jwt.PyJWK, algorithm: str) -> bool:
    """A signature key that may verify ``algorithm``: its ``use``, ``alg`` and type agree."""
    if key.public_key_use not in (None, "sig"):
        return False
    declared = key._jwk_data.get("alg")  # PyJWK keeps the JWK's own members here
    if declared is not None and declared != algorithm:
        return False
    family = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}.get(algorithm[:2])
    return family is not None and key.key_type == family
