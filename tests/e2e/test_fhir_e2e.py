"""Done when: a Synthea CKD patient posted as FHIR shows up in three places, from the sandbox.

1. risk Observations in the EHR's FHIR server (the stand-in), each with its Provenance;
2. ORU^R01 messages at the EHR's HL7v2 results inbox (the MLLP peer);
3. a CDS Hooks card, from the latest of those predictions.

One request carries the whole patient (hundreds of entries); it comes out as
the patient's risk history, one prediction per day with new results. Posting
it again changes nothing anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from auth_tokens import cds_headers
from auth_tokens import headers as auth
from conftest import CORPUS, all_resources, wait_for

from ehrbridge.cds_hooks import shown
from ehrbridge.pipelines.observation import percent
from ehrbridge.sandbox.run import BackgroundSandbox

# Stewart Stanton: 8 of his 16 visits are in KFRE's validated domain (eGFR < 60) and are
# scored; Renea Quigley, used here before, has one (pipelines/domain.py).
PATIENT = (
    CORPUS / "fhir" / "synthea-ckd" / "Stewart_Stanton_e1c92057-888b-4d8a-a459-5c1c4eed82c7.json"
)
MRN = (
    "e1c92057-888b-4d8a-a459-5c1c4eed82c7"  # Patient.identifier, system hospital.smarthealthit.org
)
FHIR_ID = "ecaea95c-46de-4ac9-a58d-4847d1a3e574"  # Patient.id in the export


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("synthea")) as running:
        yield running


def results(sandbox: BackgroundSandbox, api: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(
        f"{api}/api/results",
        params={"patient": MRN, "limit": 1000},
        headers=auth(sandbox, "viewer"),
    ).json()["results"]
    return found


def risk_observations(fhir_base: str) -> list[dict[str, Any]]:
    return all_resources(
        f"{fhir_base}/Observation",
        {"patient.identifier": f"http://hospital.smarthealthit.org|{MRN}", "_count": 200},
    )


def orus(sandbox: BackgroundSandbox) -> list[str]:
    return [
        r.message.decode()
        for r in sandbox.sandbox.inbox.messages()
        if f"PID|1||{MRN}^".encode() in r.message
    ]


def patient_resource() -> dict[str, Any]:
    bundle = orjson.loads(PATIENT.read_bytes())
    [patient] = [
        e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"
    ]
    return dict(patient)


def obx_values(message: str) -> list[float]:
    return [float(s.split("|")[5]) for s in message.split("\r") if s.startswith("OBX|")]


def test_a_synthea_patient_becomes_observations_orus_and_a_card(sandbox: BackgroundSandbox) -> None:
    api, fhir_base = sandbox.sandbox.fhir_site_url, sandbox.sandbox.fhir_base
    response = httpx.post(
        f"{api}/fhir",
        content=PATIENT.read_bytes(),
        headers={"content-type": "application/fhir+json", **auth(sandbox, "sender")},
        timeout=60,
    )
    assert response.status_code == 200 and response.json()["type"] == "transaction-response"

    # The risk history: one result per day with new kidney results in the model's
    # domain, all delivered.
    history = wait_for(
        lambda: (
            (found := results(sandbox, api))
            and all(r["status"] == "delivered" for r in found)
            and found
        ),
        timeout_s=60,
        what="the patient's risk history, delivered",
    )
    assert len(history) > 5
    assert len({r["anchor"][:10] for r in history}) == len(history)

    # 1. FHIR: one Observation per result, each with a Provenance pointing at it.
    observations = wait_for(
        lambda: (found := risk_observations(fhir_base)) and len(found) == len(history) and found,
        what="the risk Observations in the EHR",
    )
    identifiers = {o["identifier"][0]["value"] for o in observations}
    assert identifiers == {r["identifier"] for r in history}
    provenance = all_resources(f"{fhir_base}/Provenance", {"_count": 500})
    targets = {p["target"][0]["reference"] for p in provenance}
    assert {f"Observation/{o['id']}" for o in observations} <= targets

    # 2. HL7v2: one ORU per result at the results inbox, with the stored numbers.
    messages = wait_for(
        lambda: (found := orus(sandbox)) and len(found) == len(history) and found,
        what="the ORUs at the results inbox",
    )
    by_filler = {m.split("\r")[2].split("|")[3].split("^")[0]: m for m in messages}  # OBR-3
    # PID-5 is the Patient's official name, as the EHR sent it (each ORU validates strictly:
    # conftest.every_oru_conforms).
    [official] = [n for n in patient_resource()["name"] if n["use"] == "official"]
    sent_name = f"{official['family']}^{official['given'][0]}"
    assert {m.split("\r")[1].split("|")[5] for m in messages} == {sent_name}
    for result in history:
        values = obx_values(by_filler[result["identifier"]])
        assert values == [percent(result["risk_2y"]), percent(result["risk_5y"])]

    # 3. CDS Hooks: the card shows the latest stored prediction.
    latest = history[0]  # newest first
    card_request = {
        "hook": "patient-view",
        "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
        "context": {"userId": "Practitioner/1", "patientId": FHIR_ID},
    }
    [card] = httpx.post(
        f"{api}/cds-services/kfre-patient-view",
        json=card_request,
        headers=cds_headers(sandbox, api),
    ).json()["cards"]
    assert card["summary"].startswith(
        f"Kidney failure risk {shown(percent(latest['risk_2y']))} in 2 years, "
        f"{shown(percent(latest['risk_5y']))} in 5 years"
    )
    assert card["links"][0]["url"].endswith(latest["identifier"])

    # Posting the same patient again duplicates nothing, anywhere.
    again = httpx.post(
        f"{api}/fhir",
        content=PATIENT.read_bytes(),
        headers={"content-type": "application/fhir+json", **auth(sandbox, "sender")},
        timeout=60,
    )
    assert again.status_code == 200
    runtime = sandbox.sandbox.fhir_runtime
    assert runtime is not None
    raw = runtime.topic("raw")
    wait_for(lambda: runtime.workers[0].processed >= 2, what="the replay processed")
    wait_for(
        lambda: runtime.workers[1].processed >= 2 * len(history), what="the replay written back"
    )
    assert len(runtime.log.read(raw, limit=10)) == 2
    assert len(risk_observations(fhir_base)) == len(history)
    assert len(orus(sandbox)) == len(history)
