"""adapters/fhir_client.read_with_grant: the one Patient read a CDS Hooks call may make,
with the EHR's own token (fhirAuthorization), through httpx.MockTransport.
"""

from __future__ import annotations

import httpx
import pytest

from ehrbridge.adapters.fhir_client import read_with_grant
from ehrbridge.core.errors import UpstreamUnavailable

URL = "https://ehr.example/fhir/Patient/p1"


def client(answer: httpx.Response | Exception, seen: list[httpx.Request]) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handle))


def test_it_sends_the_grant_as_a_bearer_token_and_returns_the_resource() -> None:
    seen: list[httpx.Request] = []
    patient = {"resourceType": "Patient", "id": "p1"}
    got = read_with_grant(URL, "tok", 2.0, client(httpx.Response(200, json=patient), seen))
    assert got == patient
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert seen[0].headers["accept"] == "application/fhir+json"


def test_without_a_grant_it_sends_no_authorization() -> None:
    seen: list[httpx.Request] = []
    read_with_grant(URL, None, 2.0, client(httpx.Response(200, json={}), seen))
    assert "authorization" not in seen[0].headers


def test_any_other_status_is_no_resource() -> None:
    for status in (401, 404, 500):
        assert read_with_grant(URL, "t", 2.0, client(httpx.Response(status), [])) is None


def test_an_unreachable_server_or_an_unreadable_answer_is_upstream_unavailable() -> None:
    down = httpx.ConnectError("refused")
    with pytest.raises(UpstreamUnavailable):
        read_with_grant(URL, "t", 2.0, client(down, []))
    with pytest.raises(UpstreamUnavailable):
        read_with_grant(URL, "t", 2.0, client(httpx.Response(200, content=b"<html>"), []))
