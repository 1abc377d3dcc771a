"""Property tests of the HTTP API against its own OpenAPI document (schemathesis).

Schemathesis reads ``/openapi.json`` from a running sandbox site and sends
generated requests to every operation on a real socket: malformed ids,
out-of-range paging, odd bodies. Every answer must be a documented, non-5xx
response with the declared content type and schema -- an EHR or an
integration engineer never sees a stack trace for bad input.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from auth_tokens import cds_headers, headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehrbridge.sandbox.run import BackgroundSandbox

FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def running_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("api-schema")) as running:
        yield running


FUZZ = settings(
    max_examples=int(os.environ.get("EHRBRIDGE_FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def fuzz_every_operation(openapi_url: str, auth: dict[str, str]) -> list[str]:
    """Run generated requests (with ``auth``) against each operation; return the labels tested."""
    schema = schemathesis.openapi.from_url(openapi_url)
    tested: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @FUZZ
        def answers_as_documented(case: Any) -> None:
            case.call_and_validate(headers=auth)

        answers_as_documented()
        tested.append(operation.label)
    return tested


def test_the_hl7_site_api_answers_every_generated_request_as_documented(
    running_sandbox: BackgroundSandbox,
) -> None:
    tested = fuzz_every_operation(
        f"{running_sandbox.sandbox.api_url}/openapi.json", headers(running_sandbox, "admin")
    )
    assert "GET /api/results/{identifier}" in tested


def test_the_fhir_site_api_answers_every_generated_request_as_documented(
    running_sandbox: BackgroundSandbox,
) -> None:
    tested = fuzz_every_operation(
        f"{running_sandbox.sandbox.fhir_site_url}/openapi.json", headers(running_sandbox, "admin")
    )
    assert "GET /api/results" in tested


# The FHIR and CDS Hooks endpoints follow their own specifications, not our
# OpenAPI document, so they get generated JSON of every shape instead.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
RESOURCE_LIKE = st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Bundle", "Observation", "Patient", "Parameters", "x"])},
    optional={
        "type": st.sampled_from(["transaction", "batch", "collection", "history", "x"]),
        "entry": st.lists(st.dictionaries(st.sampled_from(["resource", "request"]), JSON_VALUES)),
        "status": JSON_VALUES,
        "subject": JSON_VALUES,
        "code": JSON_VALUES,
        "valueQuantity": JSON_VALUES,
        "hook": JSON_VALUES,
        "context": JSON_VALUES,
    },
)
SPEC_ENDPOINTS = [
    ("POST", "/fhir"),
    ("POST", "/fhir/Observation"),
    ("PUT", "/fhir/Patient/p1"),
    ("POST", "/fhir/subscription-notification"),
    ("POST", "/cds-services/kfre-patient-view"),
]


@pytest.mark.parametrize(("method", "path"), SPEC_ENDPOINTS)
def test_fhir_and_cds_endpoints_answer_any_json_with_a_client_error_not_a_crash(
    running_sandbox: BackgroundSandbox, method: str, path: str
) -> None:
    api = running_sandbox.sandbox.fhir_site_url
    url = api + path

    def credentials() -> dict[str, str]:  # a fresh CDS JWT per call: each jti is taken once
        if path.startswith("/cds-services"):
            return cds_headers(running_sandbox, api)
        return headers(running_sandbox, "sender")

    with httpx.Client(timeout=10) as client:

        @given(body=RESOURCE_LIKE | JSON_VALUES)
        @FUZZ
        def never_a_server_error(body: Any) -> None:
            response = client.request(
                method,
                url,
                content=json.dumps(body),
                headers={"content-type": FHIR_JSON, **credentials()},
            )
            assert response.status_code < 500, response.text[:500]
            if path.startswith("/fhir") and response.status_code >= 400:
                assert response.json()["resourceType"] == "OperationOutcome"

        never_a_server_error()
