"""Outside the model's validated domain, end to end (issue 10, finding 9), on real sockets.

A new user's tries from the issue: creatinine ``<0.2`` (bounded to 0.2, eGFR
146, an Observation "0.0 %, Normal") and a Synthea visit with eGFR 71.9
(scored "N"). Now neither reaches the EHR as a score -- no Observation, no
ORU^R01, no card -- the patient's record says why, and the count is on
``/health``. In-domain visits of the same Synthea history are still scored.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from auth_tokens import cds_headers
from auth_tokens import headers as auth
from conftest import CORPUS, all_resources, wait_for

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr

SERVICE = "/cds-services/kfre-patient-view"
STANTON = (
    CORPUS / "fhir" / "synthea-ckd" / "Stewart_Stanton_e1c92057-888b-4d8a-a459-5c1c4eed82c7.json"
)
STANTON_MRN = "e1c92057-888b-4d8a-a459-5c1c4eed82c7"
# Stewart Stanton's visits with eGFR >= 60 (CKD-EPI 2021 of his creatinine, or as reported):
# 1962-09-08 is the "eGFR 71.9 scored N".
OUT_OF_DOMAIN_DAYS = {
    "1962-09-08", "1964-09-12", "1965-09-18", "1966-09-03", "1967-01-28", "1967-08-26",
    "1968-05-25",
}  # fmt: skip
IN_DOMAIN_DAYS = {
    "1966-09-26", "1966-10-25", "1966-11-24", "1966-12-24", "1967-01-23", "1967-02-21",
    "1968-07-27", "1969-02-22",
}  # fmt: skip


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundSandbox]:
    with BackgroundSandbox(tmp_path_factory.mktemp("domain")) as running:
        yield running


def send(sandbox: BackgroundSandbox, **values: Any) -> str:
    mrn = f"M{uuid.uuid4().hex[:9]}"
    message = SyntheticEhr(patients=1).renal_oru_for(
        age=45, female=False, at=datetime(2026, 3, 2, tzinfo=UTC), mrn=mrn, **values
    )
    with MllpClient("127.0.0.1", sandbox.sandbox.mllp_port) as client:
        assert client.send(message).code == "AA"
    return mrn


def outcome_of(sandbox: BackgroundSandbox, api: str, mrn: str) -> dict[str, Any]:
    def known() -> dict[str, Any] | None:
        response = httpx.get(f"{api}/api/patients/{mrn}", headers=auth(sandbox))
        found = response.json() if response.status_code == 200 else None
        return found if found and found["last_outcome"] else None

    return wait_for(known, what="the patient's outcome")


def no_score_anywhere(sandbox: BackgroundSandbox, api: str, mrn: str, system: str) -> None:
    assert (
        httpx.get(f"{api}/api/results", params={"patient": mrn}, headers=auth(sandbox)).json()[
            "results"
        ]
        == []
    )
    observations = all_resources(
        f"{sandbox.sandbox.fhir_base}/Observation", {"patient.identifier": f"{system}|{mrn}"}
    )
    assert observations == []
    hook = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/1", "patientId": mrn},
    }
    assert httpx.post(f"{api}{SERVICE}", json=hook, headers=cds_headers(sandbox, api)).json() == {
        "cards": []
    }


def test_egfr_above_60_gets_no_score_and_the_record_says_why(sandbox: BackgroundSandbox) -> None:
    api = sandbox.sandbox.api_url
    before = httpx.get(f"{api}/health").json()["not_scored"]["out_of_domain"]
    mrn = send(sandbox, egfr=71.9, uacr_mg_g=30.0)
    patient = outcome_of(sandbox, api, mrn)
    assert patient["last_outcome"]["out_of_domain"] == ["out_of_domain: egfr 71.9 >= 60"]
    assert patient["latest_result"] is None
    assert httpx.get(f"{api}/health").json()["not_scored"]["out_of_domain"] == before + 1
    no_score_anywhere(sandbox, api, mrn, "urn:ehrbridge:sandbox:mrn")


def test_a_bounded_creatinine_that_decides_the_domain_is_named(sandbox: BackgroundSandbox) -> None:
    api = sandbox.sandbox.api_url
    mrn = send(sandbox, creatinine_mg_dl="<0.2", uacr_mg_g=30.0)
    [reason] = outcome_of(sandbox, api, mrn)["last_outcome"]["out_of_domain"]
    assert reason.startswith("egfr_from_bounded_value: creatinine <0.2 mg/dL gives egfr at least")
    no_score_anywhere(sandbox, api, mrn, "urn:ehrbridge:sandbox:mrn")


def test_a_synthea_history_is_scored_only_where_kfre_applies(sandbox: BackgroundSandbox) -> None:
    api = sandbox.sandbox.fhir_site_url
    posted = httpx.post(
        f"{api}/fhir",
        content=STANTON.read_bytes(),
        headers={"content-type": "application/fhir+json", **auth(sandbox, "sender")},
        timeout=30,
    )
    assert posted.status_code == 200

    def all_scored() -> list[dict[str, Any]] | None:
        found: list[dict[str, Any]] = httpx.get(
            f"{api}/api/results",
            params={"patient": STANTON_MRN, "limit": 100},
            headers=auth(sandbox),
        ).json()["results"]
        return found if len(found) >= len(IN_DOMAIN_DAYS) else None

    days = {r["anchor"][:10] for r in wait_for(all_scored, what="the in-domain visits scored")}
    assert days == IN_DOMAIN_DAYS  # the eGFR 71.9 visit and the others >= 60 are not
    assert not days & OUT_OF_DOMAIN_DAYS

    def orus() -> int | None:
        inbox = sandbox.sandbox.inbox.messages()
        count = sum(STANTON_MRN.encode() in r.message for r in inbox)
        return count if count >= len(IN_DOMAIN_DAYS) else None

    assert wait_for(orus, what="the ORU^R01 results") == len(IN_DOMAIN_DAYS)  # one per score
