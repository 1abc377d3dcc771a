"""What the HTTP fuzzer (tests/faults/test_fuzz_http.py) found, one regression test each (issue 10).

Each of these was a bare ``500 Internal Server Error`` (plain text, no dead
letter, a traceback in the log) on main before the fix, on a real socket
against the sandbox's FHIR site.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import cds_headers, headers

from ehrbridge.pipelines.fhir_ingest import MAX_DEPTH, FhirRejected, parse
from ehrbridge.runtime import SiteRuntime
from ehrbridge.sandbox.run import BackgroundSandbox

FHIR_JSON = "application/fhir+json"
MRN_SYSTEM = "http://hospital.smarthealthit.org"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("hostile-http")) as running:
        yield running


def runtime(site: BackgroundSandbox) -> SiteRuntime:
    found = site.sandbox.fhir_runtime
    assert found is not None
    return found


def post(site: BackgroundSandbox, path: str, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.post(
        f"{site.sandbox.fhir_site_url}{path}",
        content=content,
        headers={"content-type": FHIR_JSON, **headers(site, "sender")},
        timeout=30,
    )


def dead_letter_of(site: BackgroundSandbox, body: bytes) -> dict[str, str]:
    records = runtime(site).log.read(runtime(site).topic("dlq"), limit=100_000)
    kept = [r for r in records if r.value == body]
    assert kept, "no dead letter holds the body"
    return dict(kept[-1].headers)


def refused(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR_JSON)
    answer: dict[str, Any] = response.json()
    assert answer["resourceType"] == "OperationOutcome"
    return answer


def lab(**changes: Any) -> dict[str, Any]:
    resource = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "33914-3"}]},
        "subject": {"identifier": {"system": MRN_SYSTEM, "value": "HOSTILE-1"}},
        "effectiveDateTime": "2026-01-05T09:00:00+00:00",
        "valueQuantity": {"value": 24, "unit": "mL/min/{1.73_m2}"},
    }
    return {**resource, **changes}


def test_a_bundle_type_that_is_a_list_is_400_and_dead_lettered(site: BackgroundSandbox) -> None:
    body = b'{"resourceType":"Bundle","type":["batch"],"entry":[]}'
    for path in ("/fhir", "/fhir/Bundle"):  # was: TypeError, unhashable type: 'list'
        answer = refused(post(site, path, body), 400)
        assert answer["issue"][0]["expression"] == ["Bundle.type"]
    assert dead_letter_of(site, body)["error.reason"] == "fhir.bundle_type"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1024, 100_000])
def test_json_nested_too_deep_is_400_and_kept(site: BackgroundSandbox, depth: int) -> None:
    # Was: 255 to 1,024 levels parsed, then failed when written back (batch
    # entries, notifications: orjson writes 254 levels) -- a 500.
    nested = b"[" * depth + b"]" * depth
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": lab(), "request": {"method": "POST", "url": "Observation"}}],
    }
    body = orjson.dumps(batch).replace(b'"final"', b'"final","x":' + nested, 1)
    answer = refused(post(site, "/fhir", body), 400)
    assert "deeper" in answer["issue"][0]["diagnostics"] or "depth" in str(answer)
    assert dead_letter_of(site, body)["error.reason"] in ("fhir.too_deep", "fhir.unparseable")


def test_nesting_is_refused_in_linear_work_without_recursion() -> None:
    started = time.perf_counter()
    for depth in (MAX_DEPTH + 1, 1024, 100_000, 1_000_000):
        with pytest.raises(FhirRejected):
            parse(b'{"resourceType":"Observation","x":' + b"[" * depth + b"]" * depth + b"}")
    assert time.perf_counter() - started < 5  # generous: ~10 ms; RecursionError or worse before
    shallow = b'{"resourceType":"Observation","x":' + b"[" * 200 + b"]" * 200 + b"}"
    assert parse(shallow)["resourceType"] == "Observation"


@pytest.mark.parametrize(
    "changes",
    [
        {"code": {"coding": 5}},  # was: TypeError at fhir_facts.py (observation)
        {"code": [1]},
        {"valueQuantity": "24 mL/min"},  # was: AttributeError at fhir_facts.py (_fact)
        {"subject": {"identifier": ["x"]}},
        {"subject": {"reference": "Patient/1", "identifier": 7}},
    ],
)
def test_elements_of_the_wrong_json_type_are_a_client_answer(
    site: BackgroundSandbox, changes: dict[str, Any]
) -> None:
    response = post(site, "/fhir/Observation", lab(**changes))
    # 201: taken, and the record says why it has no value (the element is unusable).
    assert response.status_code in (200, 201, 400, 422), response.text
    if response.status_code != 201:
        assert response.json()["resourceType"] == "OperationOutcome"


def test_a_patient_whose_identifier_is_not_a_list_is_a_client_answer(
    site: BackgroundSandbox,
) -> None:
    # Was: TypeError at fhir_facts.py (_identifier).
    body = {"resourceType": "Patient", "id": "p-h2", "identifier": 3.5, "birthDate": "1960-01-01"}
    refused(post(site, "/fhir/Patient", body), 422)


def test_a_cds_prefetch_patient_with_odd_identifiers_gets_no_card_not_a_500(
    site: BackgroundSandbox,
) -> None:
    api = site.sandbox.fhir_site_url
    for identifiers in (True, 1.5, "x", [1, "x", {"system": MRN_SYSTEM, "value": 5}]):
        body = {
            "hook": "patient-view",
            "hookInstance": "d1577c69",
            "context": {"userId": "Practitioner/1", "patientId": "nobody"},
            "prefetch": {"patient": {"resourceType": "Patient", "identifier": identifiers}},
        }
        response = httpx.post(
            f"{api}/cds-services/kfre-patient-view",
            json=body,
            headers=cds_headers(site, api),
            timeout=30,
        )
        assert response.status_code == 200, response.text  # was: 'bool' object is not iterable
        assert response.json() == {"cards": []}


def test_a_bug_in_the_checks_is_a_500_outcome_and_a_dead_letter_marked_internal(
    site: BackgroundSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = runtime(site).fhir
    assert endpoint is not None

    def broken(*_: Any) -> Any:
        raise KeyError("HOSTILE-1")  # an exception's text may quote the input: not logged

    monkeypatch.setattr(endpoint.checker, "check_resource", broken)
    body = orjson.dumps(lab(id="o-bug"))
    answer = refused(post(site, "/fhir/Observation", body), 500)
    assert answer["issue"][0]["code"] == "exception"
    assert "HOSTILE-1" not in answer["issue"][0]["diagnostics"]
    letter = dead_letter_of(site, body)
    assert letter["error.reason"] == "internal"
