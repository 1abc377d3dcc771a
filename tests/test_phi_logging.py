"""No PHI in logs at INFO or above: messages are named by control id and site only."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import all_resources, wait_for

from ehrbridge.adapters.mllp_client import MllpClient
from ehrbridge.pipelines.er7 import Message
from ehrbridge.sandbox.run import BackgroundSandbox
from ehrbridge.sandbox.synthetic_ehr import SyntheticEhr


def test_logs_above_debug_carry_no_patient_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ehr = SyntheticEhr(seed=5, patients=4)
    messages = [message for _, message in ehr.stream(visits_per_patient=2)]
    bad = ehr.bad_messages()
    secrets: set[str] = set()
    for patient in ehr.patients:
        secrets |= {patient.mrn, patient.national_id, patient.family, patient.given}
        secrets.add(patient.birth_date.strftime("%Y%m%d"))
    caplog.set_level(logging.DEBUG)
    with (
        BackgroundSandbox(tmp_path) as running,
        MllpClient("127.0.0.1", running.sandbox.mllp_port) as client,
    ):
        for message in [*messages, *bad.values()]:
            client.send(message)
        wait_for(lambda: all_resources(f"{running.sandbox.fhir_base}/Observation"), what="results")
    loud = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert loud, "expected some INFO/WARNING records to check"
    text = "\n".join(r.getMessage() for r in loud)
    leaked = sorted(s for s in secrets if s and s in text)
    assert leaked == [], f"PHI in logs: {leaked}"
    for marker in ("PID|", "OBX|", "MSH|"):
        assert marker not in text, f"raw message content in logs ({marker})"
    # ... while the control ids that name messages do appear
    control_ids = {Message.parse(m).control_id for m in bad.values() if m.startswith(b"MSH")}
    assert any(cid in text for cid in control_ids)
