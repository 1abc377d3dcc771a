"""SMART on FHIR EHR launch of the patient risk page, against an EHR authorization server
on a real socket (authorize with PKCE, token with the launch's patient, Patient read).

The EHR here checks what a real one does: the client id, the registered
redirect URI, ``aud`` = its FHIR base, the ``launch`` it issued, and at the
token endpoint the code (once) with a verifier matching the S256 challenge.
ehrbridge's API runs on its own socket; the test follows the redirects as a
browser does.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import httpx
import jwt
import pytest
import yaml
from auth_tokens import localize
from predictions import prediction
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from ehrbridge._http import ThreadedServer
from ehrbridge.api import create_api
from ehrbridge.auth import Authenticator
from ehrbridge.config import SiteConfig, load_site_config
from ehrbridge.pipelines.observation import build_observation
from ehrbridge.pipelines.results import Delivery
from ehrbridge.runtime import Role, SiteRuntime
from ehrbridge.sandbox.run import sandbox_site_file

CLIENT_ID = "ehrbridge-risk-page"
MRN, EHR_PATIENT, USER = "MRN-LAUNCH-1", "ehr-42", "Practitioner/dr-who"


@dataclass
class FakeEhr:
    """An EHR's SMART authorization server and FHIR Patient endpoint."""

    base: str = ""
    system: str = ""
    redirect_uri: str = ""
    launches: set[str] = field(default_factory=lambda: {"L-123"})
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=set)
    seen: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/fhir/.well-known/smart-configuration", self.configuration),
                Route("/auth/authorize", self.authorize),
                Route("/auth/token", self.token, methods=["POST"]),
                Route("/fhir/Patient/{id}", self.patient),
            ]
        )

    async def configuration(self, request: Request) -> Response:
        self.seen.append(request.url.path)
        return JSONResponse(
            {
                "authorization_endpoint": f"{self.base}/auth/authorize",
                "token_endpoint": f"{self.base}/auth/token",
                "capabilities": ["launch-ehr", "client-public", "context-ehr-patient"],
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def authorize(self, request: Request) -> Response:
        q = request.query_params
        self.seen.append(request.url.path)
        valid = (
            q.get("response_type") == "code"
            and q.get("client_id") == CLIENT_ID
            and q.get("redirect_uri") == self.redirect_uri
            and q.get("aud") == f"{self.base}/fhir"
            and q.get("launch") in self.launches
            and q.get("code_challenge_method") == "S256"
            and "launch" in q.get("scope", "").split()
        )
        if not valid:
            return Response("invalid authorization request", 400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"challenge": q["code_challenge"], "redirect_uri": q["redirect_uri"]}
        query = urlencode({"code": code, "state": q["state"]})
        return RedirectResponse(f"{q['redirect_uri']}?{query}", status_code=302)

    async def token(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))  # no multipart library
        grant = self.codes.pop(str(form.get("code")), None)  # a code is good once
        verifier = str(form.get("code_verifier", ""))
        digest = hashlib.sha256(verifier.encode()).digest()
        challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if (
            grant is None
            or form.get("grant_type") != "authorization_code"
            or form.get("client_id") != CLIENT_ID
            or form.get("redirect_uri") != grant["redirect_uri"]
            or challenge != grant["challenge"]
        ):
            return JSONResponse({"error": "invalid_grant"}, 400)
        access = secrets.token_urlsafe(16)
        self.tokens.add(access)
        claims = {"iss": f"{self.base}/fhir", "aud": CLIENT_ID, "sub": "u1", "fhirUser": USER}
        return JSONResponse(
            {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "launch openid fhirUser patient/Patient.read",
                "patient": EHR_PATIENT,
                "id_token": jwt.encode(claims, "the EHR's key" * 3, algorithm="HS256"),
            }
        )

    async def patient(self, request: Request) -> Response:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in self.tokens or request.path_params["id"] != EHR_PATIENT:
            return JSONResponse({"resourceType": "OperationOutcome"}, 401)
        identifier = [{"system": "urn:other", "value": "X"}, {"system": self.system, "value": MRN}]
        return JSONResponse(
            {"resourceType": "Patient", "id": EHR_PATIENT, "identifier": identifier}
        )


@pytest.fixture
def launched(tmp_path: Path) -> Iterator[tuple[str, FakeEhr, SiteRuntime]]:
    """ehrbridge with smart_launch set for the fake EHR, both on real sockets."""
    ehr = FakeEhr()
    with ThreadedServer(ehr.app()) as ehr_server:
        ehr.base = ehr_server.base_url
        runtime = SiteRuntime(site(tmp_path, f"{ehr.base}/fhir"), {Role.INGEST, Role.PROCESS})
        ehr.system = runtime.config.mapping.patient.fhir_system
        store_results(runtime.config, runtime)
        app = create_api(runtime.api_parts(Authenticator(runtime.config.auth)))
        try:
            with ThreadedServer(app) as api:
                ehr.redirect_uri = f"{api.base_url}/ui/launch/callback"
                yield api.base_url, ehr, runtime
        finally:
            runtime.log.close()
            for store in ("results", "patient_links", "state"):
                getattr(runtime, store).close()


def site(tmp_path: Path, iss: str, transport: dict[str, str] | None = None) -> SiteConfig:
    config = yaml.safe_load(sandbox_site_file().read_text())
    localize(config, tmp_path / "data")
    config["data_dir"] = str(tmp_path / "data")
    config["smart_launch"] = {"client_id": CLIENT_ID, "issuers": [iss]}
    if transport is not None:
        config["transport"] = transport
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config))
    return load_site_config(tmp_path / "site.yaml")


def store_results(config: SiteConfig, runtime: SiteRuntime) -> None:
    for day, risk_2y in ((3, 0.0812), (20, 0.2153)):
        made = prediction(config, MRN, day=day, risk_2y=risk_2y)
        runtime.results.upsert([(made, build_observation(made, config))], Delivery.DELIVERED)


def test_an_ehr_launch_opens_the_launch_patients_risk_page(
    launched: tuple[str, FakeEhr, SiteRuntime],
) -> None:
    api, ehr, runtime = launched
    with httpx.Client(follow_redirects=True, timeout=10) as browser:
        page = browser.get(
            f"{api}/ui/launch", params={"iss": f"{ehr.base}/fhir", "launch": "L-123"}
        )
    assert page.status_code == 200, page.text
    assert [str(r.url.path) for r in page.history] == ["/ui/launch", "/auth/authorize"]
    text = page.text
    assert f"Patient {MRN}" in text  # the EHR's patient, as the site knows it
    assert "Kidney failure risk within 2 years: 21.5%" in text and "<td>8.1%</td>" in text
    assert "/api/results/" not in text  # the launch grants this page only
    [entry] = [e for e in runtime.audit.entries() if e["action"] == "GET /ui/launch/callback"]
    assert (entry["who"], entry["via"], entry["outcome"]) == (USER, f"smart {ehr.base}/fhir", 200)
    assert entry["patients"] == [MRN, EHR_PATIENT]


def test_only_the_configured_ehr_may_launch_and_a_callback_is_good_once(
    launched: tuple[str, FakeEhr, SiteRuntime],
) -> None:
    api, ehr, _ = launched
    other = httpx.get(
        f"{api}/ui/launch", params={"iss": "https://evil.example/fhir", "launch": "L"}
    )
    assert other.status_code == 400 and ehr.seen == []  # nothing was called
    start = httpx.get(f"{api}/ui/launch", params={"iss": f"{ehr.base}/fhir", "launch": "L-123"})
    assert start.status_code == 302
    back = httpx.get(start.headers["location"])  # the EHR's redirect to the callback
    callback = back.headers["location"]
    assert httpx.get(callback).status_code == 200
    again = httpx.get(callback)  # replayed: the state was taken, the code spent
    assert again.status_code == 400 and "open it from the EHR again" in again.text
    denied = httpx.get(f"{api}/ui/launch/callback", params={"error": "access_denied", "state": "x"})
    assert denied.status_code == 403 and MRN not in denied.text


@pytest.mark.kafka
def test_a_process_without_the_patient_state_refuses_the_launch(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """On Kafka an ingest-only process cannot check the model's domain: no risk page."""
    ehr = FakeEhr()
    with ThreadedServer(ehr.app()) as ehr_server:
        ehr.base = ehr_server.base_url
        transport = {"kind": "kafka", "bootstrap": kafka_bootstrap, "state_dir": str(tmp_path)}
        runtime = SiteRuntime(site(tmp_path, f"{ehr.base}/fhir", transport), {Role.INGEST})
        store_results(runtime.config, runtime)  # a score it holds but cannot check
        app = create_api(runtime.api_parts(Authenticator(runtime.config.auth)))
        try:
            with ThreadedServer(app) as api:
                params = {"iss": f"{ehr.base}/fhir", "launch": "L-123"}
                page = httpx.get(f"{api.base_url}/ui/launch", params=params)
                callback = httpx.get(f"{api.base_url}/ui/launch/callback?code=c&state=s")
        finally:
            runtime.log.close()
            runtime.results.close()
            runtime.patient_links.close()
    assert page.status_code == 404 and "process role" in page.text and ehr.seen == []
    assert callback.status_code == 404 and "%" not in callback.text
