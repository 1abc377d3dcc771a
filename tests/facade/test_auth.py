"""Who may call: every route's role, the CDS client's JWT, and unknown Subscriptions.

On a running sandbox (real sockets): the route table is walked and every route
not on ``PUBLIC_ROUTES`` must answer 401 without a token; the role matrix runs
every API route with no token and each role's token. CDS Hooks JWTs are checked
against a JWK Set served over HTTP by a test server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from auth_tokens import cds_service_url, headers
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ehrbridge._http import ThreadedServer
from ehrbridge.auth import PUBLIC_ROUTES
from ehrbridge.config import CdsClient, JwtIssuer, KnownSubscription, SiteConfig
from ehrbridge.sandbox.run import BackgroundSandbox

ISSUER = "https://ehr.test"
API_ISSUER = "https://idp.test/realms/hospital"  # an OpenID Connect issuer of API tokens
API_AUDIENCE = "ehrbridge-api"
ROLES = ("viewer", "operator", "admin", "sender")
# The least role of each route; admin may do everything.
NEEDS = {
    ("GET", "/api/results"): "viewer",
    ("GET", "/api/results/{identifier}"): "viewer",
    ("GET", "/api/patients/{patient_id}"): "viewer",
    ("GET", "/ui/patients/{patient_id}"): "viewer",
    ("GET", "/api/fhir"): "viewer",
    ("GET", "/metrics"): "viewer",
    ("GET", "/api/monitoring/feeds"): "viewer",
    ("GET", "/api/monitoring/drift"): "viewer",
    ("GET", "/api/evaluation"): "viewer",
    ("GET", "/api/evaluation/{model}"): "viewer",
    ("GET", "/api/models/{model}/mode"): "viewer",
    ("POST", "/api/models/{model}/mode"): "admin",  # promote/demote
    ("POST", "/api/models/{model}/alerts"): "admin",  # Alertmanager may demote
    ("GET", "/api/dlq"): "operator",
    ("GET", "/api/dlq/{offset}"): "operator",
    ("POST", "/api/dlq/replay"): "operator",
    ("GET", "/api/messages"): "operator",
    ("GET", "/api/messages/{offset}"): "operator",
    ("GET", "/api/audit"): "admin",
    ("GET", "/console/sites"): "viewer",  # the console's pages take the token or a session
    ("GET", "/console/sites/data"): "viewer",
    ("GET", "/console/messages"): "viewer",
    ("GET", "/console/messages/{topic}/{offset}"): "viewer",  # raw only to operator/admin
    ("GET", "/console/dead-letters"): "operator",
    ("GET", "/console/models"): "viewer",  # promote/demote go through the mode route
    ("GET", "/fhir/{resource_type}"): "sender",
    ("GET", "/fhir/{resource_type}/{resource_id}"): "sender",
    ("POST", "/fhir"): "sender",
    ("POST", "/fhir/"): "sender",
    ("POST", "/fhir/{resource_type}"): "sender",
    ("PUT", "/fhir/{resource_type}/{resource_id}"): "sender",
    ("POST", "/fhir/subscription-notification"): "sender",
    ("POST", "/cds-services/kfre-patient-view"): "cds",
    ("POST", "/cds-services/kfre-patient-view/feedback"): "cds",
}
GRANTED = {
    "viewer": {"viewer"},
    "operator": {"viewer", "operator"},
    "admin": {"viewer", "operator", "admin", "sender"},
    "sender": {"sender"},
}


class Keys:
    """The test EHR's signing key and the JWK Set server that publishes it."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "ES256"}]}
        self.fetches = 0

        def serve(request: Request) -> JSONResponse:
            self.fetches += 1
            return JSONResponse(self.jwks)

        self.server = ThreadedServer(Starlette(routes=[Route("/jwks", serve)])).start()

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/jwks"

    def token(self, audience: str, header: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": ISSUER,
            "sub": "ehr-client",
            "aud": audience,
            "iat": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            **claims,
        }
        return jwt.encode(payload, self.key, "ES256", headers={"kid": "k1", **(header or {})})


class Counting:
    """An EHR double that counts every request it gets."""

    def __init__(self) -> None:
        self.requests = 0

        async def anything(request: Request) -> JSONResponse:
            self.requests += 1
            return JSONResponse({"resourceType": "OperationOutcome"}, 404)

        app = Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST"])])
        self.server = ThreadedServer(app).start()


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    found = Keys()
    yield found
    found.server.stop()


@pytest.fixture(scope="module")
def ehr() -> Iterator[Counting]:
    double = Counting()
    yield double
    double.server.stop()


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, keys: Keys, ehr: Counting
) -> Iterator[BackgroundSandbox]:
    def secured(config: SiteConfig) -> SiteConfig:
        client = CdsClient(issuer=ISSUER, jwks_url=keys.url)
        cds = config.cds_hooks.model_copy(update={"clients": [*config.cds_hooks.clients, client]})
        base = f"{ehr.server.base_url}/fhir"
        known = [KnownSubscription(reference="Subscription/known")]
        subs = config.subscriptions.model_copy(update={"fhir_base": base, "known": known})
        issuer = JwtIssuer(issuer=API_ISSUER, audience=API_AUDIENCE, jwks_url=keys.url)
        auth = config.auth.model_copy(update={"jwt": [*config.auth.jwt, issuer]})
        return config.model_copy(update={"cds_hooks": cds, "subscriptions": subs, "auth": auth})

    with BackgroundSandbox(tmp_path_factory.mktemp("auth"), configure_fhir_site=secured) as run:
        yield run


def routes(site: BackgroundSandbox) -> set[tuple[str, str]]:
    runtime = site.sandbox.fhir_runtime
    assert runtime is not None and runtime.http is not None
    found = set()
    for route in runtime.http.config.app.routes:
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


def call(site: BackgroundSandbox, method: str, path: str, auth: dict[str, str]) -> int:
    url = site.sandbox.fhir_site_url + path.replace("{", "").replace("}", "")
    body = b"{}" if method in ("POST", "PUT") else None
    answer = httpx.request(
        method, url, content=body, headers={"content-type": "application/json", **auth}
    )
    return answer.status_code


def test_every_route_not_on_the_public_list_needs_a_token(site: BackgroundSandbox) -> None:
    table = routes(site)
    assert table - PUBLIC_ROUTES == set(NEEDS), "a route without a declared role"
    for method, path in sorted(table - PUBLIC_ROUTES):
        answer = httpx.request(
            method, site.sandbox.fhir_site_url + path.replace("{", "").replace("}", "")
        )
        assert answer.status_code == 401, (method, path)
        assert answer.headers["www-authenticate"].startswith("Bearer"), (method, path)
    for method, path in sorted(PUBLIC_ROUTES & table):
        assert call(site, method, path, {}) not in (401, 403), (method, path)


def test_openapi_declares_the_bearer_scheme_on_every_non_public_operation(
    site: BackgroundSandbox,
) -> None:
    document = httpx.get(f"{site.sandbox.fhir_site_url}/openapi.json").json()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if (method.upper(), path) not in PUBLIC_ROUTES:
                assert operation.get("security") == [{"bearer": []}], (method, path)


@pytest.mark.parametrize("role", [None, *ROLES])
def test_role_matrix(site: BackgroundSandbox, role: str | None) -> None:
    auth = headers(site, role) if role else {}
    for (method, path), needed in NEEDS.items():
        status = call(site, method, path, auth)
        if role is None or needed == "cds":
            assert status == 401, (role, method, path, status)
        elif needed in GRANTED[role]:
            assert status not in (401, 403), (role, method, path, status)
        else:
            assert status == 403, (role, method, path, status)


def hook(site: BackgroundSandbox, token: str) -> httpx.Response:
    body = {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "nobody"}}
    url = cds_service_url(site.sandbox.fhir_site_url)
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"})


def test_a_good_cds_jwt_gets_an_answer_and_its_replay_does_not(
    site: BackgroundSandbox, keys: Keys
) -> None:
    token = keys.token(cds_service_url(site.sandbox.fhir_site_url))
    first = hook(site, token)
    assert first.status_code == 200 and first.json() == {"cards": []}
    again = hook(site, token)
    assert again.status_code == 401 and "cards" not in again.json()
    assert "jti" in again.json()["error"]
    assert keys.fetches >= 1  # the keys came over HTTP


def test_bad_cds_jwts_are_401_with_no_card(site: BackgroundSandbox, keys: Keys) -> None:
    aud = cds_service_url(site.sandbox.fhir_site_url)
    now = int(time.time())
    public_pem = keys.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = jwt.encode({"iss": ISSUER, "aud": aud, "exp": now + 60}, None, "none")
    claims = {"iss": ISSUER, "sub": "x", "aud": aud, "iat": now, "exp": now + 60, "jti": "c"}
    confused = _hs256(claims, public_pem)  # algorithm confusion: HMAC keyed by the public key
    bad = {
        "expired": keys.token(aud, exp=now - 120, iat=now - 400),
        "wrong audience": keys.token("https://elsewhere.example/cds-services/kfre-patient-view"),
        "wrong issuer": keys.token(aud, iss="https://not-allowed.example"),
        "unsigned (alg none)": unsigned,
        "jku not allowlisted": keys.token(aud, header={"jku": "http://127.0.0.1:9/evil"}),
        "HS256 with the public key": confused,
        "no jti": keys.token(aud, jti=None),
        "too long a lifetime": keys.token(aud, exp=now + 86400),
        "not a JWT": "not.a.jwt",
    }
    for case, token in bad.items():
        answer = hook(site, token)
        assert answer.status_code == 401, (case, answer.text)
        assert "cards" not in answer.json(), case
        assert answer.headers["www-authenticate"].startswith("Bearer"), case


def _hs256(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 JWT signed by hand (PyJWT refuses a PEM key as an HMAC secret, as it should)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def api_token(keys: Keys, key: Any = None, **claims: Any) -> str:
    """An access token of the API's issuer (signed with ``key``, default the published one)."""
    now = int(time.time())
    payload = {"iss": API_ISSUER, "aud": API_AUDIENCE, "sub": "dr-jones", "iat": now,
               "nbf": now, "exp": now + 300, "roles": ["viewer"], **claims}  # fmt: skip
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key or keys.key, "ES256", headers={"kid": "k1"})


def api_get(site: BackgroundSandbox, path: str, token: str) -> httpx.Response:
    url = f"{site.sandbox.fhir_site_url}{path}"
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"})


def test_api_jwts_are_verified_against_the_issuers_jwks_over_http(
    site: BackgroundSandbox, keys: Keys
) -> None:
    fetched = keys.fetches
    viewer = api_token(keys)
    assert api_get(site, "/api/results", viewer).status_code == 200
    assert api_get(site, "/api/dlq", viewer).status_code == 403  # a viewer is not an operator
    operator = api_token(keys, roles="viewer operator")  # a scope-like string works too
    assert api_get(site, "/api/dlq", operator).status_code == 200
    assert api_get(site, "/api/results", api_token(keys, roles=[])).status_code == 403
    assert keys.fetches >= 1 and keys.fetches - fetched <= 1  # over HTTP, then cached
    runtime = site.sandbox.fhir_runtime
    assert runtime is not None
    [*_, entry] = runtime.audit.entries()  # the audit names the token's subject
    assert (entry["who"], entry["via"]) == ("dr-jones", f"jwt {API_ISSUER}")


def test_bad_api_jwts_are_401(site: BackgroundSandbox, keys: Keys) -> None:
    now = int(time.time())
    other_key = ec.generate_private_key(ec.SECP256R1())  # same kid, not the issuer's key
    public_pem = keys.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = {"iss": API_ISSUER, "aud": API_AUDIENCE, "sub": "x", "exp": now + 60}
    bad = {
        "signed by another key": api_token(keys, other_key),
        "expired": api_token(keys, exp=now - 120, iat=now - 400, nbf=now - 400),
        "not valid yet (nbf)": api_token(keys, nbf=now + 600),
        "wrong audience": api_token(keys, aud="some-other-api"),
        "wrong issuer": api_token(keys, iss="https://idp.test/realms/elsewhere"),
        "no exp": api_token(keys, exp=None),
        "no sub": api_token(keys, sub=None),
        "unsigned (alg none)": jwt.encode(claims, None, "none"),
        "HS256 with the public key": _hs256({**claims, "roles": ["admin"]}, public_pem),
    }
    for case, token in bad.items():
        answer = api_get(site, "/api/results", token)
        assert answer.status_code == 401, (case, answer.text)
        assert answer.headers["www-authenticate"].startswith("Bearer"), case
        assert "results" not in answer.json(), case


def notification(subscription: str) -> dict[str, Any]:
    """An id-only event notification whose focus is on the EHR double."""
    return {
        "resourceType": "Bundle",
        "type": "subscription-notification",
        "entry": [
            {
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": "1",
                    "subscription": {"reference": subscription},
                    "topic": "http://example.org/topic",
                    "notificationEvent": [
                        {"eventNumber": "1", "focus": {"reference": "Observation/o1"}}
                    ],
                }
            }
        ],
    }


def test_a_notification_for_an_unknown_subscription_is_refused_and_reads_nothing(
    site: BackgroundSandbox, ehr: Counting
) -> None:
    url = f"{site.sandbox.fhir_site_url}/fhir/subscription-notification"
    auth = {**headers(site, "sender"), "content-type": "application/fhir+json"}
    refused = httpx.post(url, json=notification("Subscription/unknown"), headers=auth)
    assert refused.status_code == 403
    assert refused.json()["resourceType"] == "OperationOutcome"
    assert ehr.requests == 0
    known = httpx.post(url, json=notification("Subscription/known"), headers=auth)
    assert known.status_code != 403, known.text
    assert ehr.requests > 0  # the same notification, known, does read from the EHR


def test_static_tokens_are_not_kept_in_the_clear(site: BackgroundSandbox, tmp_path: Path) -> None:
    runtime = site.sandbox.fhir_runtime
    assert runtime is not None and runtime.authenticator is not None
    token = headers(site, "viewer")["Authorization"].removeprefix("Bearer ")
    held = repr(vars(runtime.authenticator.static))
    assert token not in held
