"""No PHI in logs at INFO or above on the FHIR paths either: ingest, refusals, write-back, ORU."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import orjson
import pytest
from auth_tokens import headers as auth
from conftest import CORPUS, wait_for

from ehrbridge.sandbox.run import BackgroundSandbox

# Stewart Stanton has visits inside KFRE's domain (eGFR < 60), so ORUs do reach the inbox.
PATIENT = (
    CORPUS / "fhir" / "synthea-ckd" / "Stewart_Stanton_e1c92057-888b-4d8a-a459-5c1c4eed82c7.json"
)


def test_fhir_paths_log_no_patient_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = PATIENT.read_bytes()
    patient = orjson.loads(raw)["entry"][0]["resource"]
    secrets = {i["value"] for i in patient["identifier"]} | {patient["id"], patient["birthDate"]}
    secrets |= {patient["name"][0]["family"], *patient["name"][0]["given"]}
    caplog.set_level(logging.DEBUG)
    with BackgroundSandbox(tmp_path) as running:
        api = running.sandbox.fhir_site_url
        headers = {"content-type": "application/fhir+json", **auth(running, "sender")}
        assert (
            httpx.post(f"{api}/fhir", content=raw, headers=headers, timeout=60).status_code == 200
        )
        refused = httpx.post(
            f"{api}/fhir/Patient", json={**patient, "identifier": []}, headers=headers
        )
        assert refused.status_code == 422
        broken = raw.replace(b'"reference": "urn:uuid:', b'"reference": "urn:uuid:x', 1)
        assert httpx.post(f"{api}/fhir", content=broken, headers=headers).status_code == 400
        wait_for(running.sandbox.inbox.messages, what="ORUs at the inbox")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert any("dead-lettered" in r.getMessage() for r in loud), "expected refusals in the log"
    text = "\n".join(r.getMessage() for r in loud)
    leaked = sorted(s for s in secrets if s and s in text)
    assert leaked == [], f"PHI in logs: {leaked}"
    for marker in ("PID|", "OBX|", '"resourceType"'):
        assert marker not in text, f"raw content in logs ({marker})"
