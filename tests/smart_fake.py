"""A FHIR server that demands authorization, and a SMART token endpoint, faked at HTTP level.

``GuardedFhir`` wraps the sandbox FHIR stand-in (a real ASGI app on a real
socket) with what an EHR's authorization server does, and no more:

* ``GET /fhir/.well-known/smart-configuration`` names the token endpoint;
* ``POST /auth/token`` is SMART Backend Services' token endpoint: it checks
  the form (``grant_type=client_credentials``, the jwt-bearer assertion type,
  a scope) and the client assertion -- signature with the registered public
  key and algorithm, ``kid``, ``iss = sub = client_id``, ``aud`` = this
  endpoint, ``exp`` at most five minutes ahead, a ``jti`` never seen before
  -- and issues an opaque access token with ``expires_in``;
* every other request needs ``Authorization: Bearer <token>`` with a token
  it issued (or a static token given to it), else 401 with an
  OperationOutcome.

ehrbridge's client code runs unchanged against it: nothing is patched.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import jwt
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Client:
    client_id: str
    public_key: Any
    algorithm: str
    key_id: str


@dataclass
class AuthState:
    clients: dict[str, Client] = field(default_factory=dict)
    static_tokens: set[str] = field(default_factory=set)
    issued: set[str] = field(default_factory=set)
    seen_jti: set[str] = field(default_factory=set)
    expires_in: int = 300
    tokens_issued: int = 0
    refused: list[str] = field(default_factory=list)  # why token requests were refused
    unauthorized: int = 0  # FHIR requests answered 401
    lock: threading.Lock = field(default_factory=threading.Lock)

    def revoke_all(self) -> None:
        with self.lock:
            self.issued.clear()


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


class GuardedFhir:
    def __init__(self, fhir_app: ASGIApp, state: AuthState) -> None:
        self.fhir_app = fhir_app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.fhir_app(scope, receive, send)
            return
        request = Request(scope, receive)
        path = scope["path"]
        if path == "/fhir/.well-known/smart-configuration":
            response = self._configuration(request)
        elif path == "/auth/token":
            response = await self._token(request)
        elif self._authorized(request):
            await self.fhir_app(scope, receive, send)
            return
        else:
            with self.state.lock:
                self.state.unauthorized += 1
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [
                    {"severity": "error", "code": "login", "diagnostics": "bearer token required"}
                ],
            }
            response = _json(401, outcome, {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _configuration(self, request: Request) -> Response:
        base = f"{request.url.scheme}://{request.url.netloc}"
        return _json(
            200,
            {
                "token_endpoint": f"{base}/auth/token",
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
                "grant_types_supported": ["client_credentials"],
                "scopes_supported": ["system/*.read", "system/*.write"],
            },
        )

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        with self.state.lock:
            return bool(token) and (token in self.state.issued or token in self.state.static_tokens)

    async def _token(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))  # x-www-form-urlencoded
        token_url = f"{request.url.scheme}://{request.url.netloc}/auth/token"
        problem = self._check_request(form, token_url)
        if problem is not None:
            with self.state.lock:
                self.state.refused.append(problem)
            return _json(
                400 if problem != "invalid_client" else 401,
                {"error": "invalid_client", "error_description": problem},
            )
        token = secrets.token_urlsafe(24)
        with self.state.lock:
            self.state.issued.add(token)
            self.state.tokens_issued += 1
        return _json(
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.state.expires_in,
                "scope": str(form.get("scope", "")),
            },
        )

    def _check_request(self, form: dict[str, Any], token_url: str) -> str | None:
        if form.get("grant_type") != "client_credentials":
            return "grant_type must be client_credentials"
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return "client_assertion_type must be jwt-bearer"
        if not form.get("scope"):
            return "scope is required"
        assertion = str(form.get("client_assertion", ""))
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            return f"unreadable assertion: {exc}"
        client = self.state.clients.get(str(claims.get("iss")))
        if client is None:
            return "unknown client"
        if header.get("kid") != client.key_id or header.get("alg") != client.algorithm:
            return "wrong kid or alg"
        try:
            verified = jwt.decode(
                assertion,
                client.public_key,
                algorithms=[client.algorithm],
                audience=token_url,
                issuer=client.client_id,
                options={"require": ["exp", "iss", "sub", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return f"assertion refused: {exc}"
        if verified["sub"] != client.client_id:
            return "sub must equal iss"
        if verified["exp"] > time.time() + 300 + 5:
            return "exp more than five minutes ahead"
        with self.state.lock:
            if verified["jti"] in self.state.seen_jti:
                return "jti replayed"
            self.state.seen_jti.add(verified["jti"])
        return None
