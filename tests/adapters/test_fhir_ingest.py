"""FHIR R4 ingest on the HTTP API: resources, transactions, batches, collections, bad input.

Against the sandbox's FHIR site (``sandbox/site-fhir.yaml``, Synthea-coded
mapping) on real sockets. Every answer is checked as FHIR, every refusal for
its precise diagnostic, its dead letter, and for nothing half-stored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import headers as auth
from conftest import all_resources, wait_for
from fhir_validation import r4b

from ehrbridge.config import SiteConfig
from ehrbridge.core.contracts import Envelope, Kind
from ehrbridge.core.errors import MessageUnusable
from ehrbridge.runtime import SiteRuntime
from ehrbridge.sandbox.run import BackgroundSandbox

FHIR_JSON = "application/fhir+json"
MRN_SYSTEM = "http://hospital.smarthealthit.org"  # the fhir-synthea mapping's patient system
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LIMIT = 1_048_576


def small_limit(config: SiteConfig) -> SiteConfig:
    return config.model_copy(
        update={"http": config.http.model_copy(update={"max_body_bytes": LIMIT})}
    )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(
        tmp_path_factory.mktemp("fhir-ingest"), configure_fhir_site=small_limit
    ) as running:
        yield running


def site(sandbox: BackgroundSandbox) -> SiteRuntime:
    runtime = sandbox.sandbox.fhir_runtime
    assert runtime is not None
    return runtime


def post(
    sandbox: BackgroundSandbox,
    path: str,
    body: bytes | dict[str, Any],
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return httpx.request(
        method,
        f"{sandbox.sandbox.fhir_site_url}{path}",
        content=content,
        headers={"content-type": FHIR_JSON, **auth(sandbox, "sender"), **(headers or {})},
        timeout=30,
    )


def raw_records(sandbox: BackgroundSandbox) -> int:
    runtime = site(sandbox)
    return len(runtime.log.read(runtime.topic("raw"), limit=100_000))


def dead_letters(sandbox: BackgroundSandbox, reason: str) -> int:
    runtime = site(sandbox)
    records = runtime.log.read(runtime.topic("dlq"), limit=100_000)
    return sum(1 for r in records if r.headers.get("error.reason") == reason)


# --------------------------------------------------------------------------- test data


def patient(mrn: str, pid: str | None = None) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid or f"p-{mrn}",
        "identifier": [{"system": MRN_SYSTEM, "value": mrn}],
        "gender": "male",
        "birthDate": "1961-05-02",
    }


def lab(
    code: str,
    value: float,
    unit: str | None,
    *,
    subject: dict[str, Any] | None,
    at: str = "2026-01-05T09:00:00+00:00",
    oid: str | None = None,
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid or f"o-{uuid.uuid4().hex[:12]}",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": at,
        "valueQuantity": {"value": value},
    }
    if unit is not None:
        resource["valueQuantity"].update({"unit": unit, "system": UCUM, "code": unit})
    if subject is not None:
        resource["subject"] = subject
    return resource


def egfr(value: float, subject: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
    return lab("33914-3", value, "mL/min/{1.73_m2}", subject=subject, **kw)


def uacr(value: float, subject: dict[str, Any] | None, **kw: Any) -> dict[str, Any]:
    return lab("14959-1", value, "mg/g", subject=subject, **kw)


def by_mrn(mrn: str) -> dict[str, Any]:
    return {"identifier": {"system": MRN_SYSTEM, "value": mrn}}


def bundle(kind: str, resources: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    entries = []
    for resource in resources:
        entry: dict[str, Any] = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource}
        if kind in ("transaction", "batch"):
            entry["request"] = {"method": "POST", "url": resource["resourceType"]}
        entries.append(entry)
    return {
        "resourceType": "Bundle",
        "id": f"b-{uuid.uuid4().hex[:8]}",
        "type": kind,
        "entry": entries,
        **extra,
    }


def visit(mrn: str, kind: str = "transaction") -> dict[str, Any]:
    """A patient and one visit's eGFR and UACR, referencing the Patient by urn:uuid."""
    document = bundle(kind, [patient(mrn), {"resourceType": "Claim", "status": "active"}])
    patient_url = document["entry"][0]["fullUrl"]
    for resource in (
        egfr(24.0, {"reference": patient_url}),
        uacr(510.0, {"reference": patient_url}),
    ):
        entry: dict[str, Any] = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": resource}
        if kind in ("transaction", "batch"):
            entry["request"] = {"method": "POST", "url": "Observation"}
        document["entry"].append(entry)
    return document


def outcome(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    r4b(body)
    return body


# --------------------------------------------------------------------------- resources


def test_an_observation_is_stored_then_answered_201_with_location(
    sandbox: BackgroundSandbox,
) -> None:
    before = raw_records(sandbox)
    resource = egfr(31.0, by_mrn("MRN-SINGLE"), oid="egfr-single")
    response = post(sandbox, "/fhir/Observation", resource)
    assert response.status_code == 201, response.text
    assert response.headers["location"].endswith("/fhir/Observation/egfr-single")
    assert response.headers["content-type"].startswith(FHIR_JSON)
    assert response.json() == resource  # Prefer: return=representation is the default
    assert raw_records(sandbox) == before + 1  # durable before the 201


def test_prefer_minimal_and_operation_outcome(sandbox: BackgroundSandbox) -> None:
    minimal = post(
        sandbox, "/fhir/Patient", patient("MRN-PREF"), headers={"prefer": "return=minimal"}
    )
    assert minimal.status_code == 201 and minimal.content == b""
    assert minimal.headers["location"].endswith("/fhir/Patient/p-MRN-PREF")
    summary = post(
        sandbox, "/fhir/Patient", patient("MRN-PREF"), headers={"prefer": "return=OperationOutcome"}
    )
    assert outcome(summary)["issue"][0]["severity"] == "information"


def test_put_is_an_update_and_the_ids_must_agree(sandbox: BackgroundSandbox) -> None:
    resource = uacr(300.0, by_mrn("MRN-PUT"), oid="uacr-put")
    assert post(sandbox, "/fhir/Observation/uacr-put", resource, method="PUT").status_code == 200
    before = raw_records(sandbox)
    wrong = post(sandbox, "/fhir/Observation/another-id", resource, method="PUT")
    assert wrong.status_code == 400
    assert outcome(wrong)["issue"][0]["expression"] == ["Observation.id"]
    assert raw_records(sandbox) == before


def test_other_resource_types_are_accepted_and_counted_not_stored(
    sandbox: BackgroundSandbox,
) -> None:
    before = raw_records(sandbox)
    encounter = {"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"}}
    response = post(sandbox, "/fhir/Encounter", encounter)
    assert response.status_code == 200
    assert "not stored" in outcome(response)["issue"][0]["diagnostics"]
    assert raw_records(sandbox) == before
    stats = httpx.get(
        f"{sandbox.sandbox.fhir_site_url}/api/fhir", headers=auth(sandbox, "viewer")
    ).json()["ingest"]
    assert stats["resources_accepted"]["Encounter"] >= 1


def test_metadata_is_a_valid_capability_statement(sandbox: BackgroundSandbox) -> None:
    response = httpx.get(f"{sandbox.sandbox.fhir_site_url}/fhir/metadata")
    statement = response.json()
    r4b(statement)
    assert {r["type"] for r in statement["rest"][0]["resource"]} == {"Observation", "Patient"}


# --------------------------------------------------------------------------- Bundles


def test_a_transaction_is_stored_whole_and_answered_entry_by_entry(
    sandbox: BackgroundSandbox,
) -> None:
    before = raw_records(sandbox)
    document = visit("MRN-TXN")
    response = post(sandbox, "/fhir", document)
    assert response.status_code == 200, response.text
    answer = response.json()
    r4b(answer)
    assert answer["type"] == "transaction-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["201 Created", "200 OK", "201 Created", "201 Created"]  # Claim: counted
    assert answer["entry"][0]["response"]["location"].endswith("/fhir/Patient/p-MRN-TXN")
    assert raw_records(sandbox) == before + 1  # one record: the transaction is atomic
    observations = wait_for(
        lambda: all_resources(
            f"{sandbox.sandbox.fhir_base}/Observation",
            {"patient.identifier": f"{MRN_SYSTEM}|MRN-TXN"},
        ),
        what="the risk Observation in the EHR stand-in",
    )
    assert len(observations) == 1
    assert observations[0]["effectiveDateTime"].startswith("2026-01-05")


def test_a_transaction_about_two_patients_is_stored_once_per_patient(
    sandbox: BackgroundSandbox,
) -> None:
    """Each copy is keyed by one patient, so that patient's partition owns its state."""
    runtime = site(sandbox)
    before = raw_records(sandbox)
    first, second = visit("MRN-TWO-A"), visit("MRN-TWO-B")
    document = {**first, "entry": first["entry"] + second["entry"]}
    response = post(sandbox, "/fhir", document)
    assert response.status_code == 200, response.text
    stored = runtime.log.read(runtime.topic("raw"), limit=100_000)[before:]
    assert sorted(r.key for r in stored) == ["MRN-TWO-A", "MRN-TWO-B"]
    assert stored[0].value == stored[1].value == orjson.dumps(document)
    for mrn in ("MRN-TWO-A", "MRN-TWO-B"):
        observations = wait_for(
            lambda mrn=mrn: all_resources(
                f"{sandbox.sandbox.fhir_base}/Observation",
                {"patient.identifier": f"{MRN_SYSTEM}|{mrn}"},
            ),
            what=f"the risk Observation of {mrn}",
        )
        assert len(observations) == 1


def test_a_batch_stores_and_refuses_entry_by_entry(sandbox: BackgroundSandbox) -> None:
    document = visit("MRN-BATCH", kind="batch")
    document["entry"].append(
        {
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": egfr(20.0, None),  # no subject: refused alone
            "request": {"method": "POST", "url": "Observation"},
        }
    )
    before, refused = raw_records(sandbox), dead_letters(sandbox, "fhir.missing_subject")
    response = post(sandbox, "/fhir", document)
    assert response.status_code == 200
    answer = response.json()
    r4b(answer)
    assert answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == [
        "201 Created",
        "200 OK",
        "201 Created",
        "201 Created",
        "422 Unprocessable Entity",
    ]
    issue = answer["entry"][4]["response"]["outcome"]["issue"][0]
    assert issue["expression"] == ["Bundle.entry[4].resource.subject"]
    assert raw_records(sandbox) == before + 3  # Patient and the two Observations
    assert dead_letters(sandbox, "fhir.missing_subject") == refused + 1
    wait_for(
        lambda: all_resources(
            f"{sandbox.sandbox.fhir_base}/Observation",
            {"patient.identifier": f"{MRN_SYSTEM}|MRN-BATCH"},
        ),
        what="the batch's risk Observation",
    )


def test_a_collection_is_stored_and_summarised(sandbox: BackgroundSandbox) -> None:
    before = raw_records(sandbox)
    response = post(sandbox, "/fhir", visit("MRN-COLL", kind="collection"))
    assert response.status_code == 200
    text = outcome(response)["issue"][0]["diagnostics"]
    assert "2 Observation, 1 Patient" in text and "1 other resource(s) counted" in text
    assert raw_records(sandbox) == before + 1


# --------------------------------------------------------------------------- bad input


def broken_reference() -> dict[str, Any]:
    document = visit("MRN-BROKEN")
    document["entry"][2]["resource"]["subject"] = {"reference": "urn:uuid:not-in-this-bundle"}
    return document


def unitless() -> dict[str, Any]:
    document = visit("MRN-UNITLESS")
    del document["entry"][2]["resource"]["valueQuantity"]["unit"]
    del document["entry"][2]["resource"]["valueQuantity"]["code"]
    del document["entry"][2]["resource"]["valueQuantity"]["system"]
    return document


def timed(mrn: str, **times: Any) -> dict[str, Any]:
    """A transaction: a Patient (born 1961-05-02) and an eGFR with the times given."""
    result = egfr(30.0, by_mrn(mrn))
    result.update(times)
    return bundle("transaction", [patient(mrn), result])


def with_delete() -> dict[str, Any]:
    document = visit("MRN-DELETE")
    document["entry"][1]["request"] = {"method": "DELETE", "url": "Claim/1"}
    return document


def duplicate_full_url() -> dict[str, Any]:
    document = visit("MRN-DUP")
    document["entry"][3]["fullUrl"] = document["entry"][2]["fullUrl"]
    return document


BAD_INPUT = [
    # (name, path, body, status, dead-letter reason, issue expression)
    (
        "invalid JSON",
        "/fhir/Observation",
        b'{"resourceType": "Observation",',
        400,
        "fhir.unparseable",
        None,
    ),
    ("JSON, not a resource", "/fhir", b"[1, 2, 3]", 400, "fhir.not_a_resource", None),
    (
        "no resourceType",
        "/fhir/Patient",
        b'{"id": "x"}',
        400,
        "fhir.not_a_resource",
        "resourceType",
    ),
    (
        "wrong resourceType",
        "/fhir/Observation",
        patient("MRN-WRONG"),
        400,
        "fhir.wrong_type",
        "resourceType",
    ),
    ("a Patient to the base", "/fhir", patient("MRN-BASE"), 400, "fhir.wrong_type", "resourceType"),
    (
        "broken reference",
        "/fhir",
        broken_reference(),
        400,
        "fhir.broken_reference",
        "Bundle.entry[2].resource",
    ),
    (
        "Observation without subject",
        "/fhir/Observation",
        egfr(30.0, None),
        422,
        "fhir.missing_subject",
        "Observation.subject",
    ),
    (
        "a value with no unit",
        "/fhir",
        unitless(),
        422,
        "fhir.missing_unit",
        "Bundle.entry[2].resource.valueQuantity",
    ),
    (
        "a unit the mapping does not convert",
        "/fhir/Observation",
        lab("14959-1", 40.0, "mg/mmol", subject=by_mrn("MRN-MMOL")),
        422,
        "mapping.unknown_unit",
        None,
    ),
    (
        "a patient without the site's identifier",
        "/fhir/Patient",
        {
            "resourceType": "Patient",
            "id": "anon",
            "identifier": [{"system": "urn:other", "value": "1"}],
        },
        422,
        "fhir.missing_patient_id",
        None,
    ),
    ("a transaction that deletes", "/fhir", with_delete(), 422, "fhir.unsupported_method", None),
    (
        "a repeated fullUrl",
        "/fhir",
        duplicate_full_url(),
        400,
        "fhir.invalid",
        "Bundle.entry[3].fullUrl",
    ),
    (
        "a notification sent to the REST endpoint",
        "/fhir",
        {"resourceType": "Bundle", "type": "history", "entry": []},
        400,
        "fhir.bundle_type",
        "Bundle.type",
    ),
    # Result times that cannot be true (issue 10, finding 3): the element is named.
    (
        "a result dated in the future",
        "/fhir/Observation",
        egfr(30.0, by_mrn("MRN-3000"), at="3000-01-01T00:00:00+00:00"),
        422,
        "fhir.future_dated",
        "Observation.effectiveDateTime",
    ),
    (
        "a result issued in the future",
        "/fhir",
        timed("MRN-ISSUED", issued="3000-01-01T00:00:00Z"),
        422,
        "fhir.future_dated",
        "Bundle.entry[1].resource.issued",
    ),
    (
        "a result whose period ends in the future",
        "/fhir",
        timed(
            "MRN-PERIOD",
            effectivePeriod={"start": "2026-01-05T09:00:00Z", "end": "3000-01-01T00:00:00Z"},
        ),
        422,
        "fhir.future_dated",
        "Bundle.entry[1].resource.effectivePeriod.end",
    ),
    (
        "a result before the patient's birth date",
        "/fhir",
        timed("MRN-UNBORN", effectiveDateTime="1950-01-01T09:00:00Z"),
        422,
        "fhir.before_birth_date",
        "Bundle.entry[1].resource.effective",
    ),
    (
        "a result before 1900",
        "/fhir/Observation",
        egfr(30.0, by_mrn("MRN-1850"), at="1850-01-01"),
        422,
        "fhir.implausible_date",
        "Observation.effectiveDateTime",
    ),
    (
        "an Observation without status",
        "/fhir/Observation",
        {"resourceType": "Observation", "code": {"text": "x"}, "subject": by_mrn("M")},
        400,
        "fhir.invalid",
        "Observation.status",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_a_precise_operation_outcome_and_nothing_is_half_stored(
    sandbox: BackgroundSandbox, case: tuple[Any, ...]
) -> None:
    _, path, body, status, reason, expression = case
    before, refused = raw_records(sandbox), dead_letters(sandbox, reason)
    response = post(sandbox, path, body)
    assert response.status_code == status, response.text
    issues = outcome(response)["issue"]
    assert issues[0]["severity"] == "error" and issues[0]["diagnostics"]
    if expression is not None:
        assert issues[0]["expression"] == [expression]
    assert raw_records(sandbox) == before  # nothing stored
    assert dead_letters(sandbox, reason) == refused + 1  # kept, with its reason


def test_a_huge_body_is_413_and_the_endpoint_keeps_serving(sandbox: BackgroundSandbox) -> None:
    before = raw_records(sandbox)
    huge = (
        b'{"resourceType": "Bundle", "type": "collection", "pad": "' + b"x" * (LIMIT + 10) + b'"}'
    )
    declared = post(sandbox, "/fhir", huge)
    assert declared.status_code == 413
    assert outcome(declared)["issue"][0]["code"] == "too-costly"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(LIMIT // 65536 + 2):
            yield b" " * 65536

    streamed = httpx.post(
        f"{sandbox.sandbox.fhir_site_url}/fhir",
        content=chunks(),
        headers={"content-type": FHIR_JSON, **auth(sandbox, "sender")},
        timeout=30,
    )
    assert streamed.status_code == 413
    assert raw_records(sandbox) == before
    assert dead_letters(sandbox, "fhir.too_large") >= 2
    again = post(sandbox, "/fhir/Observation", uacr(99.0, by_mrn("MRN-AFTER")))
    assert again.status_code == 201


def test_xml_is_415(sandbox: BackgroundSandbox) -> None:
    response = post(
        sandbox, "/fhir/Patient", b"<Patient/>", headers={"content-type": "application/fhir+xml"}
    )
    assert response.status_code == 415
    assert outcome(response)["issue"][0]["code"] == "not-supported"


def test_reads_are_not_served_here(sandbox: BackgroundSandbox) -> None:
    response = httpx.get(
        f"{sandbox.sandbox.fhir_site_url}/fhir/Observation/egfr-single",
        headers=auth(sandbox, "sender"),
    )
    assert response.status_code == 405 and response.headers["allow"] == "POST, PUT"
    assert "GET /api/results" in outcome(response)["issue"][0]["diagnostics"]


def test_fhir_envelopes_from_any_source_get_the_same_checks(sandbox: BackgroundSandbox) -> None:
    """``Ingest.deliver`` (the Source contract) checks FHIR like the REST endpoint does."""
    endpoint = site(sandbox).fhir
    assert endpoint is not None

    def envelope(resource: dict[str, Any]) -> Envelope:
        return Envelope(
            "sandbox-fhir", f"src-{uuid.uuid4().hex[:8]}", orjson.dumps(resource), Kind.FHIR, ""
        )

    before = raw_records(sandbox)
    sandbox.call(endpoint.ingest.deliver(envelope(uacr(75.0, by_mrn("MRN-SOURCE")))))
    assert raw_records(sandbox) == before + 1
    with pytest.raises(MessageUnusable) as caught:
        sandbox.call(
            endpoint.ingest.deliver(envelope({"resourceType": "Encounter", "status": "planned"}))
        )
    assert caught.value.reason == "fhir.nothing_to_read"
    with pytest.raises(MessageUnusable) as missing:
        sandbox.call(endpoint.ingest.deliver(envelope(egfr(30.0, None))))
    assert missing.value.reason == "fhir.missing_subject"
    assert raw_records(sandbox) == before + 1
